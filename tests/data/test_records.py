"""ShareGPT record reading and conversion to chat messages (spec training_and_eval.md §5.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gsjax.data.records import EMPTY_THINK, read_records, to_chat, with_empty_think
from gsjax.data.skips import (
    BAD_FORMAT,
    BAD_TURNS,
    IMAGE_COUNT,
    IMAGE_PLACEMENT,
    BadRecord,
)

ROOT = Path("/data/root")


def _record(*turns: tuple[str, str], images: list[str] | None = None) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns], "images": images or []}


def test_roles_images_and_order() -> None:
    record = _record(("system", "sys"), ("user", "task"), ("assistant", "<think>t</think>\ncall"),
                     ("observation", "<image>seen<image>"), ("assistant", "<think>u</think>\nanswer"),
                     images=["a.png", "/abs/b.png"])
    chat = to_chat(record, ROOT)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert chat.messages[3]["content"] == [{"type": "image"}, {"type": "text", "text": "seen"}, {"type": "image"}]
    assert chat.image_paths == [ROOT / "a.png", Path("/abs/b.png")]
    assert chat.messages[2]["content"] == "<think>t</think>\ncall"


def test_user_tool_response_turn_keeps_its_wrapper() -> None:
    record = _record(("user", "q"), ("assistant", "<think></think>c"),
                     ("user", "<image><tool_response>\nr\n</tool_response>"), ("assistant", "<think></think>a"),
                     images=["x.png"])
    content = to_chat(record, ROOT).messages[2]["content"]
    assert content == [{"type": "image"}, {"type": "text", "text": "<tool_response>\nr\n</tool_response>"}]


def test_empty_think_added_only_without_think_tags_and_switchable() -> None:
    record = _record(("user", "q"), ("assistant", "plain answer"), ("user", "again"),
                     ("assistant", "<think>x</think>\nanswer"))
    on = to_chat(record, ROOT).messages
    off = to_chat(record, ROOT, add_empty_think=False).messages
    assert on[1]["content"] == EMPTY_THINK + "plain answer"
    assert on[3]["content"] == "<think>x</think>\nanswer"
    assert off[1]["content"] == "plain answer"
    assert with_empty_think("only </think> closing") == "only </think> closing"


def test_conversations_layout() -> None:
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    chat = to_chat(record, ROOT, add_empty_think=False)
    assert chat.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(("record", "kind"), [
    ([1, 2], BAD_FORMAT),
    ({"images": []}, BAD_FORMAT),
    (_record(("user", "q"), ("robot", "a")), BAD_FORMAT),
    ({"messages": [{"role": "user", "content": ["list"]}, {"role": "assistant", "content": "a"}]}, BAD_FORMAT),
    (_record(("user", "q"), ("assistant", "a"), ("user", "q2")), BAD_TURNS),
    (_record(("assistant", "a"), ("user", "q")), BAD_TURNS),
    (_record(("user", "q"), ("user", "q2")), BAD_TURNS),
    (_record(("user", "q"), ("system", "s"), ("assistant", "a"), ("user", "q")), BAD_TURNS),
    (_record(("system", "s")), BAD_TURNS),
    (_record(("user", "<image>q"), ("assistant", "a")), IMAGE_COUNT),
    (_record(("user", "q"), ("assistant", "a"), images=["x.png"]), IMAGE_COUNT),
    (_record(("user", "q"), ("assistant", "<image>a"), images=["x.png"]), IMAGE_PLACEMENT),
    (_record(("system", "<image>"), ("user", "q"), ("assistant", "a"), images=["x.png"]), IMAGE_PLACEMENT),
])
def test_bad_records_are_refused_with_their_kind(record: object, kind: str) -> None:
    with pytest.raises(BadRecord) as err:
        to_chat(record, ROOT)
    assert err.value.kind == kind


def test_json_array_and_jsonl_read_the_same(tmp_path: Path) -> None:
    records = [_record(("user", "q"), ("assistant", "a")), _record(("user", "é"), ("assistant", "b"))]
    array, lines = tmp_path / "a.json", tmp_path / "b.jsonl"
    array.write_text(json.dumps(records, indent=2))
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_records(array) == read_records(lines) == records


def test_broken_json_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(path)
