"""SFT records (spec training_and_eval.md §5.1): reading the file, and ShareGPT -> `encode_chat` messages.

A record is `{"messages": [{"role", "content"}, ...], "images": [...]}` (LLaMA-Factory's ShareGPT "messages"
layout; the classic `conversations` / `from` / `value` layout is read too). Rules, as upstream: an optional
leading system message, then strict prompt/assistant alternation with an even number of turns, where a prompt
turn is `user` or a tool turn (`observation` / `tool`, rendered as a user turn wrapped in `<tool_response>`).
`<image>` placeholders, counted over all messages, must equal `len(images)` and are consumed in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsjax.data.skips import (
    BAD_FORMAT,
    BAD_TURNS,
    IMAGE_COUNT,
    IMAGE_PLACEMENT,
    BadRecord,
)
from gsjax.fileio import read_json_records

IMAGE_PLACEHOLDER = "<image>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
THINK_TAGS = ("<think>", "</think>")

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "observation": "tool",
    "tool": "tool",
}
PROMPT_ROLES = ("user", "tool")
MEDIA_ROLES = ("user", "tool")


@dataclass(frozen=True)
class ChatRecord:
    """A record ready for `encode_chat`: messages whose image items carry no payload, plus the image files
    (resolved against the data root) in placeholder order."""

    messages: list[dict[str, Any]]
    image_paths: list[Path]


class RecordFile:
    """The records of one JSON-array or JSONL file, loaded on first use.

    Pickles as its path only, so grain workers each read the file themselves instead of receiving it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records: list[Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._records = None

    @property
    def records(self) -> list[Any]:
        if self._records is None:
            self._records = read_records(self.path)
        return self._records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Any:
        return self.records[index]

    def name(self, index: int) -> str:
        """How errors and logs refer to a record: its position, its `id` if it has one, and the file."""
        record = self.records[index]
        rid = record.get("id") if isinstance(record, Mapping) else None
        return f"record {index}" + (f" (id={rid!r})" if rid is not None else "") + f" of {self.path}"


def read_records(path: str | Path) -> list[Any]:
    """A JSON array, or JSON Lines (one object per non-empty line). The format is detected from the content."""
    return read_json_records(path, "SFT data file")


def _raw_turns(record: Any) -> list[tuple[str, Any]]:
    """(role, content) pairs from either layout, roles not yet checked."""
    if not isinstance(record, Mapping):
        raise BadRecord(BAD_FORMAT, f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        turns, role_key, content_key = record["messages"], "role", "content"
    elif "conversations" in record:
        turns, role_key, content_key = record["conversations"], "from", "value"
    else:
        raise BadRecord(BAD_FORMAT, "the record has neither 'messages' nor 'conversations'")
    if not isinstance(turns, list) or not turns:
        raise BadRecord(BAD_FORMAT, "the messages must be a non-empty list")
    pairs = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise BadRecord(BAD_FORMAT, f"message {i} is not an object")
        pairs.append((turn.get(role_key), turn.get(content_key)))
    return pairs


def _checked_turns(record: Any) -> list[tuple[str, str]]:
    """(canonical role, text) pairs after the §5.1 role-order rules."""
    turns = []
    for i, (role, content) in enumerate(_raw_turns(record)):
        if role not in ROLE_ALIASES:
            raise BadRecord(BAD_FORMAT, f"message {i} has unknown role {role!r}")
        if not isinstance(content, str):
            raise BadRecord(BAD_FORMAT, f"message {i} content must be a string, got {type(content).__name__}")
        turns.append((ROLE_ALIASES[role], content))
    body = turns[1:] if turns[0][0] == "system" else turns
    for i, (role, _) in enumerate(body):
        expected = PROMPT_ROLES if i % 2 == 0 else ("assistant",)
        if role not in expected:
            raise BadRecord(BAD_TURNS, f"turn {i} after the system message is {role!r}, expected one of {expected}")
    if not body or len(body) % 2:
        raise BadRecord(BAD_TURNS, f"{len(body)} turns after the system message; an even, non-zero number is needed")
    return turns


def _image_paths(record: Mapping[str, Any], data_root: Path) -> list[Path]:
    images = record.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise BadRecord(BAD_FORMAT, "'images' must be a list of non-empty path strings")
    return [data_root / p for p in images]  # an absolute p stays absolute


def _content(text: str, role: str) -> str | list[dict[str, Any]]:
    """A prompt turn's text with each `<image>` turned into a payload-less image item, in place."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    if role not in MEDIA_ROLES:
        raise BadRecord(IMAGE_PLACEMENT, f"an {IMAGE_PLACEHOLDER} placeholder sits in a {role} turn")
    items: list[dict[str, Any]] = []
    for k, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            items.append({"type": "image"})
        if part:
            items.append({"type": "text", "text": part})
    return items


def with_empty_think(text: str) -> str:
    """Upstream's rule: an assistant turn with neither `<think>` nor `</think>` gets an empty think block."""
    return text if any(tag in text for tag in THINK_TAGS) else EMPTY_THINK + text


def to_chat(record: Any, data_root: Path, *, add_empty_think: bool = True) -> ChatRecord:
    """Validate one ShareGPT record and convert it to `encode_chat` messages. Pure: no file is touched."""
    turns = _checked_turns(record)
    paths = _image_paths(record, data_root)
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if placeholders != len(paths):
        raise BadRecord(IMAGE_COUNT, f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(paths)} images")
    messages = []
    for role, text in turns:
        if role == "assistant" and add_empty_think:
            text = with_empty_think(text)
        messages.append({"role": role, "content": _content(text, role)})
    return ChatRecord(messages=messages, image_paths=paths)

