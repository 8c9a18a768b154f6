"""Host-side bookkeeping of the embedded sampler: admitted requests, length buckets, padded prefill batches,
and the prefixes that finished requests leave in their slots.

Nothing here touches a device. The sampler keeps a fixed number of decode slots; a request is prepared
(validated, M-RoPE positions computed) in the caller's thread, waits in FIFO order, is prefilled into a
free slot together with the other requests admitted at the same step boundary, and leaves its slot as
soon as it finishes, so the slot is refilled at the next boundary (continuous batching by slot refill).

A finished request's keys/values stay in its slot (prompt + all output tokens but the last, which was never
fed back). A multi-turn agent's next request repeats that history and appends the tool response, so the
sampler admits it into the same slot and prefills only the new suffix (prefix reuse); `reusable_length`
decides how much of a retained prefix a request may take: whole images only, identical pixels, and only
while the weights that computed it are still the current ones.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import jax
import numpy as np

from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.models.qwen3_vl.model import prepare_inputs
from gsjax.models.qwen3_vl.vision import VisionInputs, vision_inputs

from .engine import EngineError, FinishReason, GenerationRequest, GenerationResult, ImageInputs
from .sampling import seed_key_data


# ---------------------------------------------------------------- buckets
def power_buckets(low: int, high: int, multiple: int = 1) -> tuple[int, ...]:
    """low, 2·low, 4·low, … up to and including `high`, each rounded up to a multiple of `multiple`."""
    if low < 1 or high < low:
        raise ValueError(f"bucket range [{low}, {high}] is empty")
    out, size = [], low
    while size < high:
        out.append(size)
        size *= 2
    out.append(high)
    return tuple(sorted({-(-b // multiple) * multiple for b in out}))


def split_buckets(buckets: Sequence[int], splits: int, multiple: int = 8) -> tuple[int, ...]:
    """`buckets` with each gap cut into `splits` near-equal steps (rounded up to `multiple`): 256, 512 with
    splits=2 -> 256, 384, 512. Finer decode windows cost one compile each and save the reads of up to
    half an octave of unused cache per step."""
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    out = set(buckets)
    for low, high in zip(buckets, buckets[1:]):
        for i in range(1, splits):
            size = -(-(low + (high - low) * i // splits) // multiple) * multiple
            if low < size < high:
                out.add(size)
    return tuple(sorted(out))


def fit_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise EngineError(f"{n} exceeds the largest bucket {max(buckets)}")


def vision_rows_bucket(rows: int, minimum: int, merge_unit: int) -> int:
    """Padded patch-row count for the vision tower: a power of two >= max(rows, minimum), whole merge units."""
    size = 1 << max(math.ceil(math.log2(max(rows, minimum, 1))), 0)
    return -(-size // merge_unit) * merge_unit


# ---------------------------------------------------------------- one request
@dataclass(eq=False)
class Decoding:
    """A request from submission to result: its prompt's positions, its output so far, its slot."""

    request: GenerationRequest
    future: Future
    prompt: np.ndarray  # (n,) int32
    positions: np.ndarray  # (3, n) int32 M-RoPE ids of the prompt
    next_position: int  # M-RoPE id of the first generated token (n + delta, all three axes)
    limit: int  # max output tokens, capped by the cache length
    key_data: np.ndarray  # (2,) uint32
    images: ImageLayout | None = None  # where each image's placeholders lie, and its digest
    reuse: int = 0  # prompt tokens whose keys/values are already in its slot (prefix reuse); the rest is prefilled
    inherited_versions: tuple[str, ...] = ()  # weight versions that computed the reused prefix
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)  # weight version of each output token
    slot: int = -1
    finish: FinishReason | None = None
    decode_steps: int = 0  # decode steps dispatched for it (one step may still be in flight)

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def prefill_length(self) -> int:
        """Prompt tokens its prefill computes (all of them unless a prefix is reused)."""
        return int(self.prompt.size) - self.reuse

    def kv_versions(self) -> tuple[str, ...]:
        """Every weight version that computed some of the keys/values its slot holds for it."""
        return tuple(dict.fromkeys((*self.inherited_versions, *self.versions)))

    def next_cache_length(self) -> int:
        """Cache slots its next decode step reads: the prompt, one per earlier step, and the new token.

        Counted from dispatches, not from tokens read back, so it stays right with a step in flight.
        """
        return int(self.prompt.size) + self.decode_steps + 1

    def accept(self, token: int, logprob: float, version: str) -> bool:
        """Append one sampled token; True when that token ends the request."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.versions.append(version)
        if token in self.request.params.stop_token_ids:
            self.finish = "stop"
        elif len(self.tokens) >= self.limit:
            self.finish = "length"
        return self.done

    def result(self) -> GenerationResult:
        return GenerationResult(
            request_id=self.request.request_id, output_ids=tuple(self.tokens), logprobs=tuple(self.logprobs),
            finish_reason=self.finish or "abort", weight_version=self.versions[-1] if self.versions else "",
            prompt_tokens=int(self.prompt.size),
            extra={"weight_versions": list(self.kv_versions()), "slot": self.slot, "reused_tokens": self.reuse})

    def prefill_images(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(patch rows, grids) of the images its prefill encodes: those after the reused prefix."""
        if self.images is None:
            return None
        first = self.images.count_before(self.reuse)
        if first == self.images.count:
            return None
        im = self.request.images
        start = int(self.images.patch_rows[:first].sum())
        return (np.asarray(im.pixel_values, np.float32)[start:],
                np.asarray(im.image_grid_thw, np.int64).reshape(-1, 3)[first:])


@dataclass(frozen=True)
class ImageLayout:
    """A prompt's images: the token span of each one's placeholders, its patch rows, and a digest of its pixels."""

    starts: np.ndarray  # (I,) index of each image's first placeholder token
    ends: np.ndarray  # (I,) one past its last placeholder token
    patch_rows: np.ndarray  # (I,) rows of pixel_values it owns
    digests: tuple[bytes, ...]  # grid + pixels, so equal digests mean the same vision features

    @property
    def count(self) -> int:
        return len(self.digests)

    def count_before(self, length: int) -> int:
        """Images lying wholly in the first `length` tokens."""
        return int(np.sum(self.ends <= length))

    @classmethod
    def of(cls, config: Qwen3VLConfig, prompt: np.ndarray, images: ImageInputs) -> ImageLayout:
        grids = np.asarray(images.image_grid_thw, np.int64).reshape(-1, 3)
        rows = grids.prod(axis=1)
        tokens = rows // config.vision.merge_unit
        where = np.flatnonzero(prompt == config.image_token_id)  # prepare_inputs checked the total count
        last = np.cumsum(tokens) - 1
        pixels = np.asarray(images.pixel_values)
        bounds = np.concatenate([[0], np.cumsum(rows)])
        digests = tuple(hashlib.blake2b(g.tobytes() + np.ascontiguousarray(pixels[a:b]).tobytes(),
                                        digest_size=16).digest()
                        for g, a, b in zip(grids, bounds[:-1], bounds[1:]))
        return cls(starts=where[last - tokens + 1], ends=where[last] + 1, patch_rows=rows, digests=digests)


@dataclass(frozen=True)
class RetainedPrefix:
    """What a finished request leaves in its slot: the ids whose keys/values are cached there, in order."""

    ids: np.ndarray  # (m,) prompt + output[:-1]
    images: ImageLayout | None
    versions: tuple[str, ...]  # weight versions that computed them (reusable only if that is the current one)

    @classmethod
    def of(cls, seq: Decoding, row_length: int) -> RetainedPrefix | None:
        """The prefix a finished request leaves in a cache row of `row_length` columns (None when it produced
        nothing usable). An idle slot keeps decoding garbage after its prefix, and a write past the row lands
        on its last column, so a prefix never claims that column."""
        if seq.finish not in ("stop", "length") or not seq.tokens:
            return None
        ids = np.concatenate([seq.prompt, np.asarray(seq.tokens[:-1], seq.prompt.dtype)])[:row_length - 1]
        return cls(ids=ids, images=seq.images, versions=seq.kv_versions())


def reusable_length(prefix: RetainedPrefix | None, seq: Decoding, version: str) -> int:
    """How many leading prompt tokens of `seq` can take their keys/values from `prefix`.

    The longest common prefix of the ids, leaving at least the prompt's last token to prefill (its logits
    give the first output token), cut back to the start of any image it would split or whose pixels
    differ, and 0 unless the current weights computed the whole prefix.
    """
    if prefix is None or prefix.versions != (version,):
        return 0
    limit = min(prefix.ids.size, seq.prompt.size - 1)
    differ = np.flatnonzero(prefix.ids[:limit] != seq.prompt[:limit])
    length = int(differ[0]) if differ.size else limit
    if seq.images is None or length == 0:
        return length
    mine, theirs = seq.images, prefix.images
    for i in range(mine.count):
        if mine.starts[i] >= length:
            break
        same = theirs is not None and i < theirs.count and theirs.digests[i] == mine.digests[i]
        if mine.ends[i] > length or not same:
            return int(mine.starts[i])
    return length


def prepare(config: Qwen3VLConfig, request: GenerationRequest, future: Future, max_prompt: int,
            max_total: int) -> Decoding:
    """Validate a request and compute its prompt positions (host numpy; raises EngineError when unusable)."""
    prompt = np.asarray(request.input_ids, dtype=np.int64)
    if prompt.ndim != 1 or prompt.size == 0:
        raise EngineError(f"request {request.request_id!r}: input_ids must be a non-empty 1-D sequence")
    if prompt.size > max_prompt:
        raise EngineError(f"request {request.request_id!r}: prompt of {prompt.size} tokens exceeds the "
                          f"sampler's longest prefill bucket {max_prompt}")
    images = request.images
    try:
        inp = prepare_inputs(config, prompt[None], None,
                             None if images is None else images.pixel_values,
                             None if images is None else images.image_grid_thw)
    except ValueError as err:
        raise EngineError(f"request {request.request_id!r}: {err}") from err
    n = int(prompt.size)
    # the last output token is never written to the cache: n + limit - 1 slots suffice
    limit = min(request.params.max_tokens, max_total - n + 1)
    ids = inp["input_ids"][0]
    return Decoding(request=request, future=future, prompt=ids, positions=inp["positions"][:, 0],
                    next_position=n + int(inp["deltas"][0]), limit=limit,
                    key_data=seed_key_data(request.params.seed),
                    images=None if images is None else ImageLayout.of(config, ids, images))


def take_group(pending: list[Decoding], free: int, row_buckets: Sequence[int], length_buckets: Sequence[int],
               max_tokens: int) -> list[Decoding]:
    """The FIFO head of `pending` that one prefill call admits: at most `free` requests, and no more than
    `max_tokens` padded prompt tokens (rows bucket × length bucket) unless it is a single request."""
    group: list[Decoding] = []
    longest = 0
    for seq in pending[:free]:
        length = max(longest, seq.prefill_length)
        cost = fit_bucket(len(group) + 1, row_buckets) * fit_bucket(length, length_buckets)
        if group and cost > max_tokens:
            break
        group.append(seq)
        longest = length
    return group


# ---------------------------------------------------------------- one prefill call
@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PrefillBatch:
    """Right-padded prompts (or, with prefix reuse, prompt suffixes) of one admission group plus each row's
    slot, cache offset and sampling parameters.

    Filler rows (up to the rows bucket) hold one token, target slot `num_slots` (dropped on insert) and are
    never read.
    """

    input_ids: np.ndarray  # (k, P) int32
    attention_mask: np.ndarray  # (k, P) bool
    positions: np.ndarray  # (3, k, P) int32
    vision: VisionInputs | None
    slots: np.ndarray  # (k,) int32
    offsets: np.ndarray  # (k,) int32 tokens already cached in the slot: row i's first token is prompt[offsets[i]]
    last_index: np.ndarray  # (k,) int32 index of each row's last prompt token
    next_position: np.ndarray  # (k,) int32
    key_data: np.ndarray  # (k, 2) uint32
    temperature: np.ndarray  # (k,) float32
    top_k: np.ndarray  # (k,) int32
    top_p: np.ndarray  # (k,) float32


def build_prefill(group: Sequence[Decoding], rows: int, length: int, num_slots: int, config: Qwen3VLConfig,
                  min_vision_rows: int) -> PrefillBatch:
    ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), bool)
    mask[:, 0] = True  # filler rows attend to one token, so no row is fully masked
    positions = np.zeros((3, rows, length), np.int32)
    slots = np.full(rows, num_slots, np.int32)
    offsets = np.zeros(rows, np.int32)
    last = np.zeros(rows, np.int32)
    next_pos = np.zeros(rows, np.int32)
    keys = np.zeros((rows, 2), np.uint32)
    temperature = np.zeros(rows, np.float32)
    top_k = np.zeros(rows, np.int32)
    top_p = np.ones(rows, np.float32)
    for i, seq in enumerate(group):
        n, r, p = seq.prefill_length, seq.reuse, seq.request.params
        ids[i, :n], mask[i, :n], positions[:, i, :n] = seq.prompt[r:], True, seq.positions[:, r:]
        slots[i], offsets[i], last[i] = seq.slot, r, n - 1
        next_pos[i], keys[i] = seq.next_position, seq.key_data
        temperature[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
    return PrefillBatch(ids, mask, positions, _group_vision(group, config, min_vision_rows), slots, offsets, last,
                        next_pos, keys, temperature, top_k, top_p)


def _group_vision(group: Sequence[Decoding], config: Qwen3VLConfig, min_rows: int) -> VisionInputs | None:
    """The images the group prefills, in row order (the order the model scatters features in), padded to a
    bucket; images inside a reused prefix are not encoded again."""
    images = [im for im in (s.prefill_images() for s in group) if im is not None]
    if not images:
        return None
    pixels = np.concatenate([px for px, _ in images])
    grids = np.concatenate([g for _, g in images])
    pad = vision_rows_bucket(pixels.shape[0], min_rows, config.vision.merge_unit)
    return vision_inputs(pixels, grids, config.vision, pad_to=pad, max_frame_rows=config.runtime.vision_max_frame_rows)
