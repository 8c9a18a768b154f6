"""One agent episode: policy <-> tools until an answer or the budget ends (spec §2), and many of them
concurrently.

The loop follows upstream's round structure, budgets and terminations, with gsjax's fixes: one
reference rule in the main loop and the final step (§8 item 6), image-search errors and empty results
passed through (item 4), ignored arguments and extra calls reported to the model (item 13). Nothing the
model writes and nothing a tool does can raise out of `run_episode`; the result JSON records every
message, image, policy call and tool call and is written atomically.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsjax.agent.config import AgentConfig, public_dict
from gsjax.agent.images import EPISODE_IMAGE_NAME_CHARS, ImageRegistry, ImageStore, RegisteredImage, policy_view
from gsjax.fileio import atomic_write_bytes
from gsjax.agent.policy import ImagePart, Message, Policy, PolicyLengthError, PolicyReply
from gsjax.agent.prompts import final_step_notice, invalid_format_notice, system_prompt, too_long_notice
from gsjax.agent.protocol import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    Issue,
    ParsedTurn,
    ProtocolError,
    RenderedImage,
    ResolvedAnswer,
    append_issues,
    clean_final_turn,
    clean_turn,
    format_tool_error,
    parse_answer_body,
    parse_turn,
    render_image_search_block,
    resolve_answer,
    wrap_tool_response,
)
from gsjax.agent.tools import ToolSet
from gsjax.agent.tools.base import ToolContext, ToolError, ToolOutput

log = logging.getLogger("gsjax.agent")

TERMINATIONS = ("answer", "max_response_length_exceeded", "repeated_response", "answer_parse_failed",
                "no_answer", "error")


@dataclass(frozen=True)
class Task:
    prompt: str
    task_id: str = ""
    rollout_index: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolCallRecord:
    round: int
    name: str
    arguments: dict[str, Any]
    normalised: dict[str, Any] | None
    ignored_args: list[str]
    latency_s: float
    error: str | None
    error_code: str | None
    cache_key: str | None
    cache_status: str
    img_ids: list[str]


@dataclass(frozen=True)
class PolicyCallRecord:
    round: int
    latency_s: float
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None


@dataclass(frozen=True)
class Event:
    """Live progress for a UI: a message was appended, a tool finished, or the episode ended."""

    kind: str  # message | tool_call | end
    episode_id: str
    message: Message | None = None
    tool_call: ToolCallRecord | None = None
    result: EpisodeResult | None = None


@dataclass
class EpisodeResult:
    episode_id: str
    task_id: str
    rollout_index: int
    question: str
    date: str
    messages: list[Message]
    prediction: dict[str, Any]
    termination: str
    rounds: int
    time_taken: float
    token_usage: dict[str, int]
    timing: dict[str, float]
    policy_calls: list[PolicyCallRecord]
    tool_calls: list[ToolCallRecord]
    images: list[RegisteredImage]
    protocol_errors: list[dict[str, Any]]
    answer_issues: list[dict[str, Any]]
    response_truncated_once: bool
    format_error_once: bool
    directory: str
    config: dict[str, Any]
    meta: dict[str, Any]

    def to_record(self) -> dict[str, Any]:
        rec = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        rec["messages"] = [m.to_record() for m in self.messages]
        rec["policy_calls"] = [dataclasses.asdict(c) for c in self.policy_calls]
        rec["tool_calls"] = [dataclasses.asdict(c) for c in self.tool_calls]
        rec["images"] = [i.to_record() for i in self.images]
        return rec


def episode_dir_name(task_id: str, rollout_index: int) -> str:
    """A safe, unique folder name: sanitised id plus a hash suffix whenever sanitising changed it."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", task_id)[:80] or "task"
    if safe != task_id:
        safe += "-" + hashlib.sha256(task_id.encode("utf-8")).hexdigest()[:8]
    return f"{safe}_{rollout_index}"


def redact_tree(obj: Any, redact: Callable[[str], str]) -> Any:
    """Apply `redact` to every string (keys included) of a JSON-like tree."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_tree(k, redact): redact_tree(v, redact) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(v, redact) for v in obj]
    return obj


def write_result(result: EpisodeResult, path: Path, redact: Callable[[str], str]) -> None:
    """Atomic JSON write; every string passes the redactor first, so no key reaches the disk."""
    record = redact_tree(result.to_record(), redact)
    atomic_write_bytes(path, json.dumps(record, ensure_ascii=False, indent=1, default=str).encode("utf-8"))


class Episode:
    """The mutable state of one episode and the round logic. Use `run_episode`."""

    def __init__(self, task: Task, policy: Policy, tools: ToolSet, cfg: AgentConfig, out_dir: Path,
                 on_event: Callable[[Event], None] | None = None):
        self.task, self.policy, self.tools, self.cfg = task, policy, tools, cfg
        self.task_id = task.task_id or uuid.uuid4().hex[:12]
        self.episode_id = f"{self.task_id}:{task.rollout_index}"
        self.dir = Path(out_dir) / episode_dir_name(self.task_id, task.rollout_index)
        self.store = ImageStore(self.dir / "images", name_chars=EPISODE_IMAGE_NAME_CHARS)
        self.registry = ImageRegistry()
        self.on_event = on_event
        self.messages: list[Message] = []
        self.policy_calls: list[PolicyCallRecord] = []
        self.tool_calls: list[ToolCallRecord] = []
        self.protocol_errors: list[dict[str, Any]] = []
        self.answer_issues: list[dict[str, Any]] = []
        self.views: dict[str, ImagePart] = {}
        self.prediction: dict[str, Any] = {}
        self.termination: str | None = None
        self.llm_calls = 0
        self.truncated_once = self.format_error_once = False

    # ------------------------------------------------------------------ bookkeeping

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a broken UI callback must not end the episode
                self.on_event = None

    def _append(self, role: str, text: str, images: Sequence[ImagePart] = ()) -> None:
        msg = Message(role=role, text=text, images=tuple(images))
        self.messages.append(msg)
        self._emit(Event("message", self.episode_id, message=msg))

    def _end(self, termination: str, error: str | None = None) -> None:
        self.termination = termination
        if error is not None:
            self.prediction = {"error": error}

    def _protocol_error(self, exc: ProtocolError | Issue) -> None:
        self.protocol_errors.append({"round": self.llm_calls, **exc.to_record()})

    # ------------------------------------------------------------------ policy

    async def _call_policy(self) -> PolicyReply | Exception:
        self.llm_calls += 1
        start = time.monotonic()
        try:
            reply = await self.policy.complete(list(self.messages), self.cfg.max_new_tokens_per_turn)
        except Exception as exc:
            self.policy_calls.append(PolicyCallRecord(self.llm_calls, time.monotonic() - start, None, 0, 0,
                                                      f"{type(exc).__name__}: {exc}"))
            return exc
        self.policy_calls.append(PolicyCallRecord(self.llm_calls, time.monotonic() - start, reply.finish_reason,
                                                  reply.prompt_tokens, reply.completion_tokens, None))
        return reply

    # ------------------------------------------------------------------ answers

    def _accept(self, answer: dict[str, Any]) -> None:
        resolved: ResolvedAnswer = resolve_answer(answer, self.registry.__contains__, self.cfg.max_reference_images)
        refs = []
        for ref in resolved.references:
            entry = self.registry.get(ref.img_id)
            refs.append({"img_id": ref.img_id, "url": entry.url, "local_path": entry.local_path,
                         "title": entry.title, "page_url": entry.page_url, "sha256": entry.sha256,
                         "note": ref.note})
        self.prediction = {"gen_prompt": resolved.gen_prompt, "reference_images": refs}
        self.answer_issues.extend({"round": self.llm_calls, **i.to_record()} for i in resolved.issues)
        self.termination = "answer"

    # ------------------------------------------------------------------ tools

    async def _view(self, entry: RegisteredImage) -> ImagePart:
        """The policy's copy of a registered image (resized once per episode, content-addressed)."""
        if entry.sha256 not in self.views:
            data = await asyncio.to_thread(self.store.get, entry.sha256)
            view, w, h = await asyncio.to_thread(policy_view, data, self.cfg.image_factor,
                                                 self.cfg.image_min_pixels, self.cfg.image_max_pixels)
            digest = await asyncio.to_thread(self.store.put, view)
            self.views[entry.sha256] = ImagePart(sha256=digest, path=str(self.store.path(digest)), width=w,
                                                 height=h, img_id=entry.img_id, source_sha256=entry.sha256)
        return self.views[entry.sha256]

    def _shown_path(self, local_path: str) -> str:
        """The policy reads an image's path relative to the episode folder ("images/<hash>.jpg"): the same
        text wherever the run's folder lies, so trajectories recorded in one place (SFT data) show the
        model exactly what it meets in another (RL rollouts), and a run's tokens do not depend on its
        folder. The registry and the answer keep the absolute path."""
        return Path(local_path).relative_to(self.dir).as_posix()  # the episode's store lies in its folder

    async def _observe_images(self, query: str, out: ToolOutput) -> tuple[str, list[ImagePart], list[str]]:
        """Register hits, render the IMG block, attach the first few images (spec §4.3). Without
        hits the tool's own text (error or empty-result advice) is the body (§8 item 4)."""
        if not out.hits:
            return out.text, [], []
        entries: list[RegisteredImage] = []
        for hit in out.hits[: self.cfg.max_rendered_search_items]:
            entry = self.registry.register(sha256=hit.sha256, local_path=str(self.store.path(hit.sha256)),
                                           title=hit.title, url=hit.url, page_url=hit.page_url)
            if entry not in entries:
                entries.append(entry)
        shown = [RenderedImage(e.img_id, e.title, e.url, self._shown_path(e.local_path), e.page_url) for e in entries]
        body = render_image_search_block(query, shown)
        parts = [await self._view(e) for e in entries[: self.cfg.max_images_per_search_for_model]]
        return body, parts, [e.img_id for e in entries]

    async def _tool_turn(self, parsed: ParsedTurn) -> None:
        issues = list(parsed.warnings)
        for w in parsed.warnings:
            self._protocol_error(w)
        call = parsed.tool_call
        images: list[ImagePart] = []
        img_ids: list[str] = []
        record: dict[str, Any] = {"name": call.name if call else "", "arguments": dict(call.arguments) if call else {},
                                  "normalised": None, "ignored_args": [], "latency_s": 0.0, "error": None,
                                  "error_code": None, "cache_key": None, "cache_status": "not_called"}
        try:
            if parsed.error is not None:
                raise parsed.error
            assert call is not None
            tool = self.tools.get(call.name)
            args, ignored = tool.parse_args(call.arguments)
        except ProtocolError as exc:
            self._protocol_error(exc)
            body = format_tool_error(exc, call.name if call else None)
            record.update(error=str(exc), error_code=exc.code)
        except Exception as exc:  # an argument checker that trips over odd input: still the model's turn
            self._protocol_error(Issue("dispatch_failed", f"{type(exc).__name__}: {exc}"))
            body = f"[Tool Error]: {type(exc).__name__}: {exc}"
            record.update(error=body, error_code="dispatch_failed")
        else:
            record.update(normalised=args, ignored_args=ignored)
            if ignored:
                issues.append(Issue("ignored_arguments",
                                    f"ignored argument(s) not in the {tool.name} schema: {', '.join(ignored)}"))
            result = await self.tools.call(tool, args, ToolContext(store=self.store))
            out = result.output
            if tool.name == "image_search":
                body, images, img_ids = await self._observe_images(args["query"], out)
            else:
                body = out.text
            if out.notes:
                body = body + "\n\n" + "\n".join(f"[Note] {n}" for n in out.notes)
            record.update(latency_s=round(result.latency_s, 6), error=out.error, error_code=out.error_code,
                          cache_key=result.cache_key, cache_status=result.cache_status)
        rec = ToolCallRecord(round=self.llm_calls, img_ids=img_ids, **record)
        self.tool_calls.append(rec)
        self._emit(Event("tool_call", self.episode_id, tool_call=rec))
        self._append("user", wrap_tool_response(append_issues(body, issues)), images)

    # ------------------------------------------------------------------ rounds

    async def _main_rounds(self) -> None:
        previous: str | None = None
        prev_truncated = False
        while self.llm_calls < self.cfg.max_llm_calls and self.termination is None:
            reply = await self._call_policy()
            if isinstance(reply, PolicyLengthError):
                self._end("max_response_length_exceeded", f"max_response_length_exceeded: {reply}")
                return
            if isinstance(reply, Exception):
                self._end("error", f"policy call failed: {type(reply).__name__}: {reply}")
                return
            text = clean_turn(reply.text)
            truncated = reply.finish_reason == "length"
            self.truncated_once |= truncated
            if previous is not None and text == previous:
                self._append("assistant", text)
                self._end("repeated_response", "repeated_response: the same turn was produced twice")
                return
            previous = text
            parsed = parse_turn(text)
            self._append("assistant", text)
            if parsed.kind == "tool_call":
                await self._tool_turn(parsed)
            elif parsed.kind == "answer":
                if parsed.error is not None:
                    self._protocol_error(parsed.error)
                    self._end("answer_parse_failed", f"answer_parse_failed: {parsed.error}")
                    return
                self._accept(parsed.answer or {})
            else:
                assert parsed.error is not None
                self.format_error_once = True
                self._protocol_error(parsed.error)
                if truncated and prev_truncated:
                    self._end("repeated_response", "repeated_response: two truncated turns in a row")
                    return
                self._append("user", too_long_notice() if truncated else invalid_format_notice(str(parsed.error)))
            prev_truncated = truncated

    async def _final_step(self) -> None:
        """One forced answer call; a parse failure or an exception leaves the previous state."""
        self._append("user", final_step_notice(self.cfg.max_reference_images))
        reply = await self._call_policy()
        if isinstance(reply, Exception):
            return
        text = clean_final_turn(reply.text)
        self._append("assistant", text)
        if ANSWER_OPEN not in text or ANSWER_CLOSE not in text:
            self._protocol_error(ProtocolError("final step produced no <answer>...</answer>"))
            return
        try:
            answer = parse_answer_body(text)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._accept(answer)

    async def run(self) -> EpisodeResult:
        start = time.monotonic()
        schemas = self.tools.schemas()
        self._append("system", system_prompt(schemas, self.cfg.max_tool_calls_advertised,
                                             self.cfg.max_reference_images, self.cfg.date, self.cfg.system_prompt))
        self._append("user", self.task.prompt)
        try:
            await self._main_rounds()
            if self.termination != "answer" and self.llm_calls >= self.cfg.max_llm_calls:
                await self._final_step()
        except ToolError as exc:  # strict-replay miss or corrupt cache: not reproducible, say so
            self._end("error", f"{exc.code}: {exc}")
        except Exception as exc:  # a bug must cost one episode, not the run
            self._end("error", f"internal error: {type(exc).__name__}: {exc}")
        if self.termination != "answer" and "error" not in self.prediction:
            self._end("no_answer", "No valid answer found")
        assert self.termination in TERMINATIONS
        log.info("episode %s ended with %s after %d model call(s) and %d tool call(s)", self.episode_id,
                 self.termination, self.llm_calls, len(self.tool_calls))
        return self._result(time.monotonic() - start)

    def _result(self, elapsed: float) -> EpisodeResult:
        return EpisodeResult(
            episode_id=self.episode_id, task_id=self.task_id, rollout_index=self.task.rollout_index,
            question=self.task.prompt, date=self.cfg.date, messages=list(self.messages),
            prediction=self.prediction, termination=self.termination or "error", rounds=self.llm_calls,
            time_taken=round(elapsed, 6),
            token_usage={"prompt_tokens": sum(c.prompt_tokens for c in self.policy_calls),
                         "completion_tokens": sum(c.completion_tokens for c in self.policy_calls)},
            timing={"policy_s": round(sum(c.latency_s for c in self.policy_calls), 6),
                    "tools_s": round(sum(c.latency_s for c in self.tool_calls), 6)},
            policy_calls=list(self.policy_calls), tool_calls=list(self.tool_calls),
            images=self.registry.entries(), protocol_errors=list(self.protocol_errors),
            answer_issues=list(self.answer_issues), response_truncated_once=self.truncated_once,
            format_error_once=self.format_error_once, directory=str(self.dir), config=public_dict(self.cfg),
            meta=dict(self.task.meta))


async def run_episode(task: Task, policy: Policy, tools: ToolSet, cfg: AgentConfig, out_dir: Path | str,
                      on_event: Callable[[Event], None] | None = None) -> EpisodeResult:
    """Run one episode and write `<out_dir>/<task>_<rollout>/result.json` (+ its images folder)."""
    episode = Episode(task, policy, tools, cfg, Path(out_dir), on_event)
    result = await episode.run()
    await asyncio.to_thread(write_result, result, episode.dir / "result.json", tools.redact)
    episode._emit(Event("end", episode.episode_id, result=result))
    return result


async def run_episodes(tasks: Sequence[Task], policy: Policy, tools: ToolSet, cfg: AgentConfig,
                       out_dir: Path | str, concurrency: int | None = None,
                       on_event: Callable[[Event], None] | None = None) -> list[EpisodeResult]:
    """Many episodes, at most `concurrency` (default cfg.episode_concurrency) at a time, in input order."""
    ids = [(t.task_id, t.rollout_index) for t in tasks if t.task_id]
    if len(set(ids)) != len(ids):
        raise ValueError("run_episodes: two tasks share a (task_id, rollout_index); their folders would collide")
    limit = asyncio.Semaphore(concurrency or cfg.episode_concurrency)

    async def one(task: Task) -> EpisodeResult:
        async with limit:
            return await run_episode(task, policy, tools, cfg, out_dir, on_event)

    return list(await asyncio.gather(*(one(t) for t in tasks)))
