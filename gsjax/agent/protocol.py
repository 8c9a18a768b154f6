"""The text protocol between the policy and the loop: parse one assistant turn, format observations.

Pure functions only. Every way a turn can be malformed maps to a typed `ProtocolError` that the loop
turns into an observation (spec/agent.md §2.3, §4.1); nothing here raises past `parse_turn`.
Detection order follows upstream: a turn holding both `<tool_call>` and `</tool_call>` is a tool call
even if it also has an answer; then the answer; anything else is a format error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import json5

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

_ANSWER_RE = re.compile(r"<answer>\s*(\{.*?\})\s*</answer>", re.DOTALL)
IMG_ID_RE = re.compile(r"^IMG_\d{3,}$")


# --------------------------------------------------------------------------- typed errors


class ProtocolError(Exception):
    """A malformed assistant turn. `code` is a stable machine-readable name for records/metrics."""

    code = "protocol_error"

    def to_record(self) -> dict[str, str]:
        return {"code": self.code, "message": str(self)}


class FormatError(ProtocolError):
    """Neither a complete tool call nor a complete answer (e.g. a missing closing tag)."""

    code = "invalid_format"


class ToolCallSyntaxError(ProtocolError):
    """The text between the tool-call tags is not parseable JSON(5)."""

    code = "tool_call_bad_json"


class ToolCallShapeError(ProtocolError):
    """The tool-call JSON parsed but is not `{"name": str, "arguments": object}`."""

    code = "tool_call_bad_shape"


class UnknownToolError(ProtocolError):
    """The call names a tool that this episode does not offer."""

    code = "unknown_tool"

    def __init__(self, name: str, available: Sequence[str]):
        self.name, self.available = name, list(available)
        super().__init__(f"Tool {name} not found. Available tools: {self.available}")


class ToolArgumentError(ProtocolError):
    """Arguments missing, of the wrong type, or out of range for the named tool's schema."""

    code = "tool_bad_arguments"

    def __init__(self, tool: str, message: str):
        self.tool = tool
        super().__init__(f"invalid arguments for {tool}: {message}")


class AnswerSyntaxError(ProtocolError):
    """The answer body is not one strict-JSON object."""

    code = "answer_bad_json"


class AnswerShapeError(ProtocolError):
    """The answer JSON lacks `gen_prompt`/`reference_images` or has them with the wrong types."""

    code = "answer_bad_shape"


@dataclass(frozen=True)
class Issue:
    """A non-fatal protocol problem: recorded in the episode and, for tool calls, told to the model."""

    code: str
    message: str

    def to_record(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


# --------------------------------------------------------------------------- parsed shapes


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedTurn:
    """One assistant turn classified. Exactly one of tool_call/answer/error is meaningful per kind."""

    kind: Literal["tool_call", "answer", "invalid"]
    tool_call: ToolCall | None = None
    answer: dict[str, Any] | None = None
    error: ProtocolError | None = None
    warnings: tuple[Issue, ...] = ()


@dataclass(frozen=True)
class Reference:
    img_id: str
    note: str


@dataclass(frozen=True)
class ResolvedAnswer:
    gen_prompt: str
    references: tuple[Reference, ...]
    issues: tuple[Issue, ...] = field(default=())


# --------------------------------------------------------------------------- text surgery


def cut_at(text: str, marker: str) -> str:
    """Text before the first `marker` (all of it when absent)."""
    i = text.find(marker)
    return text if i < 0 else text[:i]


def clean_turn(text: str) -> str:
    """Main-loop cleanup: drop a hallucinated tool response and everything after it, then strip."""
    return cut_at(text, TOOL_RESPONSE_OPEN).strip()


def clean_final_turn(text: str) -> str:
    """Forced-final-step cleanup: tool calls are forbidden, so cut at either marker."""
    return cut_at(cut_at(text, TOOL_RESPONSE_OPEN), TOOL_CALL_OPEN).strip()


# --------------------------------------------------------------------------- parsing


def parse_tool_call_body(body: str) -> ToolCall:
    """Parse the JSON5 object between the tool-call tags into a ToolCall or raise a typed error."""
    if not body.strip():
        raise ToolCallSyntaxError("the <tool_call> block is empty")
    try:
        obj = json5.loads(body.strip())
    except Exception as exc:  # json5 raises ValueError, RecursionError, ...: all are the model's fault
        raise ToolCallSyntaxError(f"tool call is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise ToolCallShapeError(f"tool call must be a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolCallShapeError('tool call needs a non-empty string "name"')
    arguments = obj.get("arguments", {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ToolCallShapeError(f'"arguments" must be a JSON object, got {type(arguments).__name__}')
    return ToolCall(name=name.strip(), arguments=dict(arguments))


def parse_answer_body(text: str) -> dict[str, Any]:
    """Extract and strictly parse the answer object; check its two keys and their types."""
    m = _ANSWER_RE.search(text)
    if m is None:
        raise AnswerSyntaxError("no JSON object found between <answer> and </answer>")
    try:
        obj = json.loads(m.group(1))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise AnswerSyntaxError(f"answer is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise AnswerShapeError(f"answer must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("gen_prompt", "reference_images") if k not in obj]
    if missing:
        raise AnswerShapeError(f"answer is missing {', '.join(repr(k) for k in missing)}")
    if not isinstance(obj["gen_prompt"], str) or not obj["gen_prompt"].strip():
        raise AnswerShapeError('"gen_prompt" must be a non-empty string')
    if not isinstance(obj["reference_images"], list):
        raise AnswerShapeError(f'"reference_images" must be a list, got {type(obj["reference_images"]).__name__}')
    return obj


def _format_error_reason(text: str) -> str:
    if not text.strip():
        return "the response was empty"
    if TOOL_CALL_OPEN in text and TOOL_CALL_CLOSE not in text:
        return "<tool_call> was opened but never closed with </tool_call>"
    if TOOL_CALL_CLOSE in text and TOOL_CALL_OPEN not in text:
        return "</tool_call> appeared without an opening <tool_call>"
    if ANSWER_OPEN in text and ANSWER_CLOSE not in text:
        return "<answer> was opened but never closed with </answer>"
    if ANSWER_CLOSE in text and ANSWER_OPEN not in text:
        return "</answer> appeared without an opening <answer>"
    return "no <tool_call>...</tool_call> and no <answer>...</answer> block was found"


def parse_turn(text: str) -> ParsedTurn:
    """Classify a cleaned assistant turn (spec §2.3). Never raises."""
    if TOOL_CALL_OPEN in text and TOOL_CALL_CLOSE in text:
        start = text.index(TOOL_CALL_OPEN) + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, start)
        if end < 0:
            err = ToolCallSyntaxError("</tool_call> appears before <tool_call>, so the call has no body")
            return ParsedTurn(kind="tool_call", error=err)
        warnings: list[Issue] = []
        extra = text[end + len(TOOL_CALL_CLOSE):].count(TOOL_CALL_OPEN)
        if extra:
            warnings.append(Issue("extra_tool_calls_ignored",
                                  f"{extra} extra <tool_call> block(s) in this turn were ignored; "
                                  "call exactly one tool per turn"))
        if ANSWER_OPEN in text:
            warnings.append(Issue("answer_ignored_beside_tool_call",
                                  "the <answer> in this turn was ignored because the turn also has a "
                                  "<tool_call>; give either one tool call or one answer"))
        try:
            call = parse_tool_call_body(text[start:end])
        except ProtocolError as exc:
            return ParsedTurn(kind="tool_call", error=exc, warnings=tuple(warnings))
        return ParsedTurn(kind="tool_call", tool_call=call, warnings=tuple(warnings))
    if ANSWER_OPEN in text and ANSWER_CLOSE in text:
        try:
            return ParsedTurn(kind="answer", answer=parse_answer_body(text))
        except ProtocolError as exc:
            return ParsedTurn(kind="answer", error=exc)
    return ParsedTurn(kind="invalid", error=FormatError(_format_error_reason(text)))


def resolve_answer(answer: Mapping[str, Any], is_known_id: Callable[[str], bool],
                   max_references: int) -> ResolvedAnswer:
    """Apply the one gsjax reference rule (§8 items 5, 6) to a shape-checked answer.

    Non-object items, empty/unknown/duplicate ids are dropped and counted; the first
    `max_references` surviving references are kept in the model's order; the rest are dropped and
    counted. The answer stays valid even with zero references (the reward gate judges that).
    """
    issues: list[Issue] = []
    kept: list[Reference] = []
    seen: set[str] = set()
    overflow = 0
    for i, item in enumerate(answer["reference_images"]):
        if not isinstance(item, dict):
            issues.append(Issue("reference_not_object", f"reference_images[{i}] is not an object"))
            continue
        raw_id = item.get("img_id")
        img_id = raw_id.strip() if isinstance(raw_id, str) else ""
        if not img_id:
            issues.append(Issue("empty_img_id", f"reference_images[{i}] has no img_id"))
            continue
        if not is_known_id(img_id):
            issues.append(Issue("unknown_img_id", f"reference_images[{i}].img_id {img_id!r} was never issued"))
            continue
        if img_id in seen:
            issues.append(Issue("duplicate_img_id", f"reference_images[{i}].img_id {img_id!r} repeats"))
            continue
        seen.add(img_id)
        if len(kept) >= max_references:
            overflow += 1
            continue
        note = item.get("note")
        text = note if isinstance(note, str) else ("" if note is None else json.dumps(note))
        kept.append(Reference(img_id=img_id, note=text))
    if overflow:
        issues.append(Issue("too_many_references",
                            f"{overflow} reference(s) beyond the maximum of {max_references} were dropped"))
    return ResolvedAnswer(gen_prompt=answer["gen_prompt"].strip(), references=tuple(kept), issues=tuple(issues))


# --------------------------------------------------------------------------- formatting


def wrap_tool_response(body: str) -> str:
    """Tool output as the model sees it (spec §4.1): always a user message, never a tool role."""
    return f"{TOOL_RESPONSE_OPEN}\n{body}\n{TOOL_RESPONSE_CLOSE}"


def format_tool_call(name: str, arguments: Mapping[str, Any], think: str | None = None) -> str:
    """A well-formed tool-call turn (used by fixtures, demos and scripted policies)."""
    head = f"{THINK_OPEN}{think}{THINK_CLOSE}\n" if think is not None else ""
    body = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{head}{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def format_answer(gen_prompt: str, references: Sequence[Mapping[str, str]], think: str | None = None) -> str:
    """A well-formed answer turn."""
    head = f"{THINK_OPEN}{think}{THINK_CLOSE}\n" if think is not None else ""
    body = json.dumps({"gen_prompt": gen_prompt, "reference_images": [dict(r) for r in references]},
                      ensure_ascii=False)
    return f"{head}{ANSWER_OPEN}\n{body}\n{ANSWER_CLOSE}"


def format_tool_error(exc: ProtocolError, tool_name: str | None) -> str:
    """Dispatch failures as tool-response bodies, in upstream's three wordings (spec §4.1)."""
    if isinstance(exc, UnknownToolError):
        return str(exc)
    if isinstance(exc, ToolArgumentError) and tool_name:
        return f"Error calling tool {tool_name}: {exc}"
    return f"[Tool Error]: {exc}"


def append_issues(body: str, issues: Sequence[Issue]) -> str:
    """Tell the model about ignored parts of its turn after the tool body (never instead of it)."""
    if not issues:
        return body
    notes = "\n".join(f"[Format note] {i.message}" for i in issues)
    return f"{body}\n\n{notes}"


@dataclass(frozen=True)
class RenderedImage:
    img_id: str
    title: str
    url: str
    local_path: str
    page_url: str = ""


def render_image_search_block(query: str, items: Sequence[RenderedImage]) -> str:
    """The registered image-search results as the model reads them (spec §4.3)."""
    lines = [f"--- image search result for [{query}] ---"]
    for it in items:
        lines.append(f"{it.img_id}: title: {it.title}")
        lines.append(f"  url: {it.url}")
        lines.append(f"  local_path: {it.local_path}")
        if it.page_url:
            lines.append(f"  page_url: {it.page_url}")
    lines.append("--- end of image search result ---")
    return "\n".join(lines)
