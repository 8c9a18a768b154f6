"""Token-in/token-out policy over a `RolloutEngine`, for RL rollouts (spec/agent.md §7.2, §8 item 11).

The loop still speaks `Message`s, but the model never sees a re-rendered history. Each episode keeps one
growing token record:

    prompt(t+1) = prompt(t) + kept sampled ids(t) + closing ids + ids of the new observation turn(s)

- Sampled assistant ids are kept exactly as the engine produced them, with their logprobs, loss mask 1
  (the sampled `<|im_end|>` included).
- Everything the loop adds has loss mask 0: the `\\n` after `<|im_end|>`, a closing `<|im_end|>` after a
  truncated turn, tool responses, notices and the next `<|im_start|>assistant\\n`.
- A hallucinated `<tool_response>` token ends the kept ids there (the rest is dropped, the turn is closed
  with mask-0 tokens), matching what the loop keeps of the text.
- A new observation is rendered by the chat template as the text the template adds after the history it
  already rendered (checked to be a pure append), image pads expanded from each image's real grid; its
  images are preprocessed once and carried, in prompt order, with every later request and in the record.
- The loop stores cleaned assistant text, not ids; turns where decoding and re-encoding the sampled ids
  would not give them back (what upstream's re-tokenisation silently got wrong) are counted.

`EnginePolicy` is one object shared by concurrent episodes (as `run_episodes` uses it): each asyncio task
gets its own `EngineConversation` (a context variable), and a task takes its episode's record with
`take_record()` after `run_episode` returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gsjax.agent.policy import Message, PolicyError, PolicyLengthError, PolicyReply
from gsjax.processing.chat import ASSISTANT_FOOTER, encode_chat
from gsjax.processing.images import ImageProcessorConfig, process_images
from gsjax.processing.template import chat_template, render_chat
from gsjax.processing.tokens import IM_END, IM_END_ID, IMAGE_PAD, IMAGE_PAD_ID, STOP_TOKEN_IDS, TOOL_RESPONSE_START_ID
from gsjax.rollout.engine import GenerationRequest, GenerationResult, ImageInputs, RolloutEngine, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnginePolicyConfig:
    """Sampling for rollouts (upstream RL: temperature 1.0) and the whole-context guard (spec §2.5: 36000)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_context_tokens: int = 36_000
    stop_token_ids: tuple[int, ...] = STOP_TOKEN_IDS
    abort_retries: int = 2


@dataclass(frozen=True)
class TokenImage:
    """One image of the context, as the processor saw it and as the file the agent stored."""

    pixel_values: np.ndarray  # (patches, patch_dim) float32
    grid_thw: tuple[int, int, int]
    encoded: bytes
    sha256: str
    path: str


@dataclass(frozen=True)
class TurnRecord:
    """One policy call: where its sampled ids sit in the record and how they came about."""

    index: int
    prompt_len: int  # the request's prompt = record ids [0, prompt_len)
    sampled: int  # ids the engine returned
    kept: int  # ids kept in the record from prompt_len on (mask 1)
    finish_reason: str
    weight_version: str  # the version of the turn's last token
    weight_versions: tuple[str, ...]  # every version that produced some of its tokens (weights swapped mid-turn)
    request_id: str
    latency_s: float
    retokenize_mismatch: bool
    tool_response_cut: bool


@dataclass
class TokenRecord:
    """An episode's exact token stream for the trainer: ids, loss mask, rollout logprobs (0 where the mask is
    0), the images in prompt order, and the per-turn provenance (weight version of each sampled turn)."""

    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    images: list[TokenImage] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    retokenize_mismatches: int = 0
    edited_turns: int = 0
    tool_response_cuts: int = 0
    template_fallbacks: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def extend(self, ids: Sequence[int], mask: int, logprobs: Sequence[float] | None = None) -> None:
        self.input_ids += [int(i) for i in ids]
        self.loss_mask += [mask] * len(ids)
        self.logprobs += [float(x) for x in logprobs] if logprobs is not None else [0.0] * len(ids)

    @property
    def weight_versions(self) -> list[str]:
        return [t.weight_version for t in self.turns]

    def image_inputs(self) -> ImageInputs | None:
        if not self.images:
            return None
        return ImageInputs(pixel_values=np.concatenate([i.pixel_values for i in self.images]),
                           image_grid_thw=np.asarray([i.grid_thw for i in self.images], dtype=np.int64),
                           encoded=tuple(i.encoded for i in self.images))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Numpy arrays for a training batch (image arrays only when there are images)."""
        out = {"input_ids": np.asarray(self.input_ids, np.int32), "loss_mask": np.asarray(self.loss_mask, np.int8),
               "rollout_logprobs": np.asarray(self.logprobs, np.float32)}
        images = self.image_inputs()
        if images is not None:
            out["pixel_values"], out["image_grid_thw"] = images.pixel_values, images.image_grid_thw
        return out

    def to_record(self) -> dict[str, Any]:
        """JSON-ready summary (ids, mask, logprobs, image refs by hash, turns, counters); no pixels."""
        return {"input_ids": list(self.input_ids), "loss_mask": list(self.loss_mask), "logprobs": list(self.logprobs),
                "images": [{"sha256": i.sha256, "path": i.path, "grid_thw": list(i.grid_thw)} for i in self.images],
                "turns": [dataclasses.asdict(t) for t in self.turns], "weight_versions": self.weight_versions,
                "retokenize_mismatches": self.retokenize_mismatches, "edited_turns": self.edited_turns,
                "tool_response_cuts": self.tool_response_cuts, "template_fallbacks": self.template_fallbacks}


class HistoryMismatch(PolicyError):
    """The messages do not continue this conversation (another episode, or history edited by the caller)."""


def _template_message(message: Message) -> dict[str, Any]:
    """A `Message` as the chat template sees it: image placeholders first, then the text (spec §4.4)."""
    if not message.images:
        return {"role": message.role, "content": message.text}
    return {"role": message.role,
            "content": [{"type": "image"} for _ in message.images] + [{"type": "text", "text": message.text}]}


def _token_images(messages: Sequence[Message], pixels: np.ndarray | None, grid: np.ndarray | None) -> list[TokenImage]:
    """Split processor output into per-image records, each with its stored file's bytes and hash."""
    parts = [part for m in messages for part in m.images]
    if not parts:
        return []
    assert pixels is not None and grid is not None and len(grid) == len(parts)
    out, start = [], 0
    for part, row in zip(parts, grid):
        n = int(np.prod(row))
        data = Path(part.path).read_bytes()
        out.append(TokenImage(pixels[start:start + n], (int(row[0]), int(row[1]), int(row[2])), data,
                              part.sha256 or hashlib.sha256(data).hexdigest(), part.path))
        start += n
    return out


def _read_images(messages: Sequence[Message], cfg: ImageProcessorConfig) -> list[TokenImage]:
    paths = [part.path for m in messages for part in m.images]
    if not paths:
        return []
    return _token_images(messages, *process_images(paths, cfg))


@dataclass(frozen=True)
class _Prepared:
    """What to append before the next generation, and what rendering it noticed."""

    ids: list[int]
    images: list[TokenImage]
    edited: bool = False
    template_fallback: bool = False


class EngineConversation:
    """The token state of one episode. Not shared between tasks; `EnginePolicy` routes calls to it."""

    def __init__(self, engine: RolloutEngine, tokenizer: Any, image_cfg: ImageProcessorConfig,
                 config: EnginePolicyConfig, conversation_id: str, tokenizer_lock: threading.Lock | None = None):
        self.engine, self.tokenizer, self.image_cfg, self.config = engine, tokenizer, image_cfg, config
        self.id = conversation_id
        self.record = TokenRecord()
        self.seen: list[Message] = []  # the messages of the last successful call
        self.last_text: str | None = None  # what the last reply decoded to
        self._lock = tokenizer_lock or threading.Lock()
        self._template = getattr(tokenizer, "chat_template", None) or chat_template()
        self._special = dict(getattr(tokenizer, "special_tokens_map", {}) or {})

    def continues(self, messages: Sequence[Message]) -> bool:
        """True when `messages` extend this conversation (always, before its first turn)."""
        if not self.seen:
            return True
        n = len(self.seen)
        return len(messages) > n and list(messages[:n]) == self.seen and messages[n].role == "assistant"

    # ---------------------------------------------------------------- rendering (worker thread)

    def _render(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        return render_chat([_template_message(m) for m in messages], add_generation_prompt=generation_prompt,
                           template=self._template, **self._special)

    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

    def _first_prompt(self, messages: Sequence[Message]) -> _Prepared:
        paths = [part.path for m in messages for part in m.images]
        enc = encode_chat([_template_message(m) for m in messages], self.tokenizer, self.image_cfg,
                          add_generation_prompt=True, images=paths or None)
        return _Prepared([int(i) for i in enc.input_ids], _token_images(messages, enc.pixel_values, enc.image_grid_thw))

    def _observation(self, history: Sequence[Message], new: Sequence[Message], closing: str) -> _Prepared:
        """Ids of `closing` + the template's text for `new` after `history` + the generation prompt."""
        before = self._render(history, False)
        full = self._render([*history, *new], True)
        fallback = not (full.startswith(before) and before.endswith(ASSISTANT_FOOTER))
        # a template that re-renders history differently: render the new turns alone instead
        delta = self._render(new, True) if fallback else full[len(before):]
        images = _read_images(new, self.image_cfg)
        counts = [int(np.prod(i.grid_thw)) // self.image_cfg.merge_size**2 for i in images]
        if delta.count(IMAGE_PAD) != len(counts):
            raise PolicyError(f"the template rendered {delta.count(IMAGE_PAD)} image placeholders for "
                              f"{len(counts)} images")
        pieces = (closing + delta).split(IMAGE_PAD)
        text = pieces[0] + "".join(IMAGE_PAD * c + rest for c, rest in zip(counts, pieces[1:]))
        ids = self._encode(text)
        if sum(1 for i in ids if i == IMAGE_PAD_ID) != sum(counts):
            raise PolicyError("image pads did not tokenise one id per pad")
        return _Prepared(ids, images, template_fallback=fallback)

    def _prepare(self, messages: Sequence[Message]) -> _Prepared:
        """The ids (and images) to append before the next generation; runs in a worker thread."""
        with self._lock:
            if not self.seen:
                return self._first_prompt(messages)
            n = len(self.seen)
            closing = "\n" if self.record.input_ids[-1] == IM_END_ID else IM_END + "\n"
            prepared = self._observation(messages[: n + 1], messages[n + 1:], closing)
            edited = messages[n].text != (self.last_text or "").strip()
            return _Prepared(prepared.ids, prepared.images, edited, prepared.template_fallback)

    def _decode(self, ids: Sequence[int], skip_special: bool) -> str:
        with self._lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def _roundtrips(self, ids: Sequence[int]) -> bool:
        with self._lock:
            text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
            return self._encode(text) == list(ids)

    # ---------------------------------------------------------------- one turn

    def _seed(self) -> int | None:
        if self.config.seed is None:
            return None
        key = f"{self.config.seed}:{self.id}:{len(self.record.turns)}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF

    async def _generate(self, request: GenerationRequest) -> GenerationResult:
        for attempt in range(self.config.abort_retries + 1):
            result = await self.engine.generate(request)
            if result.finish_reason != "abort":
                return result
            log.warning("%s: generation aborted (%s); attempt %d", request.request_id,
                        result.extra.get("message", ""), attempt + 1)
        raise PolicyError(f"generation aborted {self.config.abort_retries + 1} times: {request.request_id}")

    async def complete(self, messages: Sequence[Message], max_tokens: int) -> PolicyReply:
        if not self.continues(messages):
            raise HistoryMismatch("these messages do not extend the conversation's sampled history")
        messages = list(messages)
        prepared = await asyncio.to_thread(self._prepare, messages)
        appended, new_images = prepared.ids, prepared.images
        prompt = self.record.input_ids + appended
        if len(prompt) + max_tokens > self.config.max_context_tokens:
            raise PolicyLengthError(f"context of {len(prompt)} tokens + {max_tokens} new exceeds the maximum context "
                                    f"length of {self.config.max_context_tokens}")
        images = [*self.record.images, *new_images]
        image_inputs = TokenRecord(images=images).image_inputs()
        params = SamplingParams(max_tokens=max_tokens, temperature=self.config.temperature, top_p=self.config.top_p,
                                top_k=self.config.top_k, stop_token_ids=self.config.stop_token_ids, seed=self._seed())
        request_id = f"{self.id}-t{len(self.record.turns)}"
        start = time.monotonic()
        result = await self._generate(GenerationRequest(tuple(prompt), params, image_inputs, request_id))
        latency = time.monotonic() - start
        sampled = list(result.output_ids)
        if len(result.logprobs) != len(sampled) or not sampled:
            raise PolicyError(f"{request_id}: engine returned {len(sampled)} ids and {len(result.logprobs)} logprobs")
        cut = TOOL_RESPONSE_START_ID in sampled
        kept = sampled[: sampled.index(TOOL_RESPONSE_START_ID)] if cut else sampled
        mismatch = not await asyncio.to_thread(self._roundtrips, kept) if kept else False
        text = await asyncio.to_thread(self._decode, sampled, True)

        # commit: only a successful turn changes the record, so the prefix invariant always holds
        record = self.record
        record.extend(appended, 0)
        record.images += new_images
        record.extend(kept, 1, result.logprobs[: len(kept)])
        record.retokenize_mismatches += mismatch
        record.tool_response_cuts += cut
        record.edited_turns += prepared.edited
        record.template_fallbacks += prepared.template_fallback
        versions = tuple(result.extra.get("weight_versions") or (result.weight_version,))
        record.turns.append(TurnRecord(len(record.turns), len(prompt), len(sampled), len(kept), result.finish_reason,
                                       result.weight_version, versions, request_id, round(latency, 6), mismatch, cut))
        self.seen, self.last_text = messages, text
        return PolicyReply(text=text, finish_reason="length" if result.finish_reason == "length" else "stop",
                           prompt_tokens=len(prompt), completion_tokens=len(sampled), token_ids=tuple(sampled),
                           logprobs=tuple(result.logprobs),
                           extra={"weight_version": result.weight_version, "request_id": request_id})


class EnginePolicy:
    """A `Policy` for the agent loop over a rollout engine, one token record per asyncio task (= episode).

    Usage in a trainer::

        async def one(task):
            result = await run_episode(task, policy, tools, cfg, out_dir)
            return result, policy.take_record()
    """

    def __init__(self, engine: RolloutEngine, tokenizer: Any, image_cfg: ImageProcessorConfig | None = None,
                 config: EnginePolicyConfig | None = None, name: str = "ep"):
        self.engine, self.tokenizer = engine, tokenizer
        self.image_cfg = image_cfg or ImageProcessorConfig()
        self.config = config or EnginePolicyConfig()
        self.name = name
        self.dropped_records = 0
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._current: contextvars.ContextVar[EngineConversation | None] = contextvars.ContextVar(
            f"gsjax_engine_policy_{id(self)}", default=None)

    def conversation(self) -> EngineConversation | None:
        """This task's conversation, if it has one."""
        return self._current.get()

    def new_conversation(self) -> EngineConversation:
        conv = EngineConversation(self.engine, self.tokenizer, self.image_cfg, self.config,
                                  f"{self.name}{next(self._counter)}", self._lock)
        self._current.set(conv)
        return conv

    async def complete(self, messages: Sequence[Message], max_tokens: int) -> PolicyReply:
        conv = self._current.get()
        if conv is None or not conv.continues(messages):
            if conv is not None and conv.record.turns:
                self.dropped_records += 1
                log.warning("a new episode started in a task whose previous token record was never taken")
            conv = self.new_conversation()
        return await conv.complete(messages, max_tokens)

    def take_record(self) -> TokenRecord | None:
        """This task's token record (None if it made no call); the next call starts a fresh one."""
        conv = self._current.get()
        self._current.set(None)
        return None if conv is None else conv.record
