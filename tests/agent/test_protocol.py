"""Turn parsing and answer resolution (pure), and a fuzz of malformed turns through whole episodes."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from gsjax.agent.config import AgentConfig, ToolsConfig
from gsjax.agent.loop import TERMINATIONS, Task, run_episode
from gsjax.agent.protocol import (
    AnswerShapeError,
    AnswerSyntaxError,
    FormatError,
    ToolCall,
    ToolCallShapeError,
    ToolCallSyntaxError,
    clean_final_turn,
    clean_turn,
    format_answer,
    format_tool_call,
    parse_turn,
    resolve_answer,
)
from gsjax.agent.tools import open_toolset
from tests.agent.fakes import ScriptedPolicy, answer_with_first_image

CALL = format_tool_call("search", {"queries": ["eiffel tower"]}, think="plan")
ANSWER = format_answer("the first reference image", [{"img_id": "IMG_001", "note": "n"}], think="done")


def test_valid_tool_call_and_answer() -> None:
    t = parse_turn(CALL)
    assert t.kind == "tool_call" and t.tool_call == ToolCall("search", {"queries": ["eiffel tower"]})
    a = parse_turn(ANSWER)
    assert a.kind == "answer" and a.error is None and a.answer is not None
    assert a.answer["reference_images"] == [{"img_id": "IMG_001", "note": "n"}]


def test_lenient_json5_and_missing_arguments() -> None:
    t = parse_turn("<tool_call>\n{name: 'search', arguments: {queries: ['a',],},}\n</tool_call>")
    assert t.tool_call == ToolCall("search", {"queries": ["a"]})
    assert parse_turn('<tool_call>{"name": "search"}</tool_call>').tool_call == ToolCall("search", {})


@pytest.mark.parametrize("body, error", [
    ("{not json", ToolCallSyntaxError),
    ("", ToolCallSyntaxError),
    ("[1, 2]", ToolCallShapeError),
    ('{"arguments": {}}', ToolCallShapeError),
    ('{"name": 3}', ToolCallShapeError),
    ('{"name": "search", "arguments": [1]}', ToolCallShapeError),
    ("[" * 5000, ToolCallSyntaxError),
])
def test_bad_tool_call_bodies_are_typed(body: str, error: type) -> None:
    t = parse_turn(f"<think>x</think><tool_call>{body}</tool_call>")
    assert t.kind == "tool_call" and isinstance(t.error, error)


def test_tool_call_wins_over_answer_and_extras_are_reported() -> None:
    t = parse_turn(CALL + "\n" + CALL + "\n" + ANSWER)
    assert t.kind == "tool_call" and t.tool_call is not None
    codes = [w.code for w in t.warnings]
    assert codes == ["extra_tool_calls_ignored", "answer_ignored_beside_tool_call"]


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("<think>x</think><tool_call>{\"name\": \"search\"}", "never closed with </tool_call>"),
    ("<answer>{\"gen_prompt\": \"x\"", "never closed with </answer>"),
    ("just prose", "no <tool_call>"),
])
def test_format_errors_name_the_culprit(text: str, reason: str) -> None:
    t = parse_turn(text)
    assert t.kind == "invalid" and isinstance(t.error, FormatError) and reason in str(t.error)


@pytest.mark.parametrize("body, error", [
    ("nothing", AnswerSyntaxError),
    ('{"gen_prompt": "x", "reference_images": []', AnswerSyntaxError),
    ("{'gen_prompt': 'x'}", AnswerSyntaxError),
    ('{"gen_prompt": "x"}', AnswerShapeError),
    ('{"gen_prompt": 5, "reference_images": []}', AnswerShapeError),
    ('{"gen_prompt": "  ", "reference_images": []}', AnswerShapeError),
    ('{"gen_prompt": "x", "reference_images": {}}', AnswerShapeError),
])
def test_bad_answers_are_typed(body: str, error: type) -> None:
    t = parse_turn(f"<answer>{body}</answer>")
    assert t.kind == "answer" and isinstance(t.error, error)


def test_answer_regex_takes_nested_object_up_to_closing_tag() -> None:
    t = parse_turn('<answer>\n {"gen_prompt": "a {b}", "reference_images": [{"img_id": "IMG_002"}]} \n</answer>')
    assert t.answer == {"gen_prompt": "a {b}", "reference_images": [{"img_id": "IMG_002"}]}


def test_resolve_answer_one_rule_for_bad_references() -> None:
    known = {"IMG_001", "IMG_002", "IMG_003", "IMG_004"}
    answer = {"gen_prompt": " p ", "reference_images": [
        "IMG_001", {"img_id": ""}, {"img_id": "IMG_009"}, {"img_id": "IMG_002", "note": "a"},
        {"img_id": "IMG_002"}, {"img_id": "IMG_001", "note": None}, {"img_id": "IMG_003", "note": 7},
        {"img_id": "IMG_004"}]}
    r = resolve_answer(answer, known.__contains__, max_references=3)
    assert r.gen_prompt == "p"
    assert [(x.img_id, x.note) for x in r.references] == [("IMG_002", "a"), ("IMG_001", ""), ("IMG_003", "7")]
    assert [i.code for i in r.issues] == ["reference_not_object", "empty_img_id", "unknown_img_id",
                                          "duplicate_img_id", "too_many_references"]


def test_cleanups_cut_hallucinated_responses() -> None:
    assert clean_turn(CALL + "\n<tool_response>fake</tool_response>") == CALL
    assert clean_final_turn(ANSWER + "\n<tool_call>{}</tool_call>") == ANSWER


# ---------------------------------------------------------------------- fuzz

_SEEDS = [CALL, ANSWER, format_tool_call("image_search", {"query": "eiffel tower", "top_k": 2}, think="i"),
          format_tool_call("browse", {"url": "https://kb.gsjax.example/eiffel-tower", "query": "q"}, think="b")]
_JUNK = ["<tool_call>", "</tool_call>", "<answer>", "</answer>", "<think>", "</think>", "<tool_response>", "{", "}",
         "[", "]", '"', ",", ":", "\n", "IMG_999", "null", "\\", "\x00", "🙂", '"name"', '"arguments"', "top_k",
         '"unknown_tool"', "1e999", "NaN", '"' + "9" * 5000 + '"']


def mutate(text: str, rng: random.Random) -> str:
    """One to four random edits: delete, duplicate, insert junk, swap tags, retype a value, truncate."""
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        i = rng.randrange(len(text) + 1)
        j = min(len(text), i + rng.randint(1, 12))
        if op == 0:
            text = text[:i] + text[j:]
        elif op == 1:
            text = text[:i] + text[i:j] * 2 + text[j:]
        elif op == 2:
            text = text[:i] + rng.choice(_JUNK) + text[i:]
        elif op == 3:
            text = text.replace("search", rng.choice(["serch", "image_search", "browse", ""]), 1)
        elif op == 4:
            text = text.replace('"eiffel tower"', rng.choice(["5", "null", "[]", "{}", "true", '["a", 3]']), 1)
        elif op == 5:
            text = text[: rng.randrange(len(text) + 1)]
        else:
            text = text + "\n" + rng.choice(_SEEDS)
    return text


def test_fuzzed_malformed_turns_never_end_an_episode_abnormally(tmp_path: Path) -> None:
    rng = random.Random(1234)
    outputs = list(dict.fromkeys(mutate(rng.choice(_SEEDS), rng) for _ in range(320)))
    cfg = AgentConfig(date="2025-06-01", max_llm_calls=3)

    async def main() -> list[tuple[str, str, bool]]:
        out = []
        async with open_toolset(ToolsConfig(backend="local")) as tools:
            for n, bad in enumerate(outputs):
                policy = ScriptedPolicy([bad, bad] if n % 5 == 0 else [bad, answer_with_first_image])
                r = await run_episode(Task("Draw the Eiffel Tower", task_id=f"fuzz{n}"), policy, tools, cfg, tmp_path)
                flagged = any(e["round"] == 1 for e in r.protocol_errors + r.answer_issues)
                out.append((r.termination, r.directory, flagged))
        return out

    results = asyncio.run(main())
    assert sum(flagged for *_, flagged in results) >= 200  # malformed ones, each seen and named by the loop
    kinds = {t for t, *_ in results}
    assert kinds <= set(TERMINATIONS) and "error" not in kinds
    assert len(kinds) >= 3  # the mutations reach several different endings
    assert sum(t == "answer" for t, *_ in results) >= 150  # after a malformed turn the episode recovers
    for _, directory, _ in results:
        rec = json.loads((Path(directory) / "result.json").read_text())
        assert rec["termination"] in TERMINATIONS
        assert rec["messages"][0]["role"] == "system" and rec["messages"][1]["role"] == "user"
