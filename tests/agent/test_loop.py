"""Whole episodes: every tool over loopback HTTP, faults everywhere, terminations, concurrency, secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from gsjax.agent.config import AgentConfig, PolicyConfig, Secret, ToolsConfig
from gsjax.agent.loop import EpisodeResult, Task, run_episode, run_episodes
from gsjax.agent.policy import Message, OpenAIChatPolicy, PolicyLengthError, PolicyReply
from gsjax.agent.protocol import format_answer, format_tool_call
from gsjax.agent.tools import open_toolset
from tests.agent.fakes import (
    JINA_KEYS,
    POLICY_KEY,
    SERPER_KEY,
    SUMMARY_KEY,
    FakeWeb,
    ScriptedPolicy,
    Step,
    answer_with_first_image,
    http_script,
    make_jpeg,
    research_steps,
    serper_config,
)

PAGE_URL = "https://news.example/eiffel"


def stock_web(web: FakeWeb, query: str = "eiffel tower", n: int = 3, tag: str = "") -> None:
    """Serper results, hosted images and a page for the research script."""
    web.image_items[query] = [{"title": f"pic {tag}{i}", "imageUrl": web.host_image(f"{tag}{i}.jpg", make_jpeg(hash((tag, i)) % 10_000)),
                               "link": f"https://pages.example/{tag}{i}"} for i in range(n)]
    web.pages[PAGE_URL] = "The tower is repainted every seven years in Eiffel Tower Brown."


def run_http(web: FakeWeb, policy_cfg: PolicyConfig, tools_cfg: ToolsConfig, agent_cfg: AgentConfig,
             steps: Sequence[Step], out: Path, task_id: str = "t") -> EpisodeResult:
    web.policy_script = http_script(steps)

    async def main() -> EpisodeResult:
        async with open_toolset(tools_cfg) as tools, httpx.AsyncClient() as client:
            return await run_episode(Task("Paint the Eiffel Tower at dusk", task_id=task_id),
                                     OpenAIChatPolicy(policy_cfg, client), tools, agent_cfg, out)

    return asyncio.run(main())


def run_local(steps: Sequence[Step], out: Path, cfg: AgentConfig | None = None,
              finish: Any = lambda t: "stop", policy: Any = None) -> EpisodeResult:
    async def main() -> EpisodeResult:
        async with open_toolset(ToolsConfig(backend="local")) as tools:
            return await run_episode(Task("Draw the Eiffel Tower", task_id="local"),
                                     policy or ScriptedPolicy(steps, finish), tools,
                                     cfg or AgentConfig(date="2025-06-01"), out)

    return asyncio.run(main())


def user_texts(r: EpisodeResult) -> list[str]:
    return [m.text for m in r.messages[2:] if m.role == "user"]


# ---------------------------------------------------------------------- full episodes


def test_full_http_episode_with_every_tool(web: FakeWeb, policy_cfg: PolicyConfig, tools_cfg: ToolsConfig,
                                           agent_cfg: AgentConfig, tmp_path: Path) -> None:
    stock_web(web)
    r = run_http(web, policy_cfg, tools_cfg, agent_cfg, research_steps(PAGE_URL), tmp_path)
    assert r.termination == "answer" and r.rounds == 4
    assert [c.name for c in r.tool_calls] == ["search", "image_search", "browse"]
    assert all(c.error is None and c.latency_s > 0 and c.cache_status == "live" for c in r.tool_calls)
    assert [m.role for m in r.messages] == ["system", "user"] + ["assistant", "user"] * 3 + ["assistant"]
    assert r.messages[0].text.endswith("\n 2025-06-01") and r.messages[1].text == "Paint the Eiffel Tower at dusk"
    obs = user_texts(r)
    assert obs[0].startswith("<tool_response>\n--- search result for [eiffel tower paint colour] ---")
    assert "IMG_001: title: pic 0\n  url: " in obs[1] and "  page_url: https://pages.example/0" in obs[1]
    assert obs[2] == "<tool_response>\nSUMMARY: paint colour\n</tool_response>"
    assert len(r.messages[5].images) == 3 and r.tool_calls[1].img_ids == ["IMG_001", "IMG_002", "IMG_003"]
    (ref,) = r.prediction["reference_images"]
    assert ref["img_id"] == "IMG_001" and ref["url"].endswith("/img/0.jpg")
    data = Path(ref["local_path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == ref["sha256"] and ref["sha256"][:16] == Path(ref["local_path"]).stem
    # the policy reads the path relative to the episode folder (the same text wherever the run lies)
    assert f"  local_path: images/{Path(ref['local_path']).name}\n" in obs[1] and str(tmp_path) not in obs[1]
    # the policy saw images before the text of the tool-response turn, as data URLs
    last_chat = [x for x in web.log if x["route"] == "chat"][-1]["body"]
    parts = last_chat["messages"][5]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 3 + ["text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert last_chat["max_tokens"] == 4096 and last_chat["temperature"] == 0.6
    rec = json.loads((Path(r.directory) / "result.json").read_text())
    assert rec["termination"] == "answer" and rec["date"] == "2025-06-01"
    assert len(rec["messages"]) == 9 and len(rec["tool_calls"]) == 3 and len(rec["images"]) == 3
    assert rec["token_usage"] == {"prompt_tokens": 44, "completion_tokens": 28}
    for m in rec["messages"]:
        for img in m["images"]:
            assert hashlib.sha256(Path(img["path"]).read_bytes()).hexdigest() == img["sha256"]


def test_episode_recovers_from_one_fault_on_every_external_call(web: FakeWeb, policy_cfg: PolicyConfig,
                                                                 tools_cfg: ToolsConfig, agent_cfg: AgentConfig,
                                                                 tmp_path: Path) -> None:
    stock_web(web)
    for route, fault in [("chat", "500"), ("search", "timeout"), ("images", "garbage"), ("img", "500"),
                         ("jina", "slow"), ("summary", "garbage")]:
        web.inject(route, fault)
    r = run_http(web, policy_cfg, tools_cfg, agent_cfg, research_steps(PAGE_URL), tmp_path)
    assert r.termination == "answer" and all(c.error is None for c in r.tool_calls)
    assert web.count("chat") == 5 and web.count("search") == 2 and web.count("images") == 2


def test_persistent_faults_become_observations_with_reasons(web: FakeWeb, policy_cfg: PolicyConfig,
                                                            tools_cfg: ToolsConfig, agent_cfg: AgentConfig,
                                                            tmp_path: Path) -> None:
    stock_web(web)
    web.inject("search", "500", "500", "500")
    web.inject("images", "error_json", "error_json", "error_json")
    web.inject("jina", "500", "500", "500")
    r = run_http(web, policy_cfg, tools_cfg, agent_cfg, research_steps(PAGE_URL), tmp_path)
    obs = user_texts(r)
    assert "Search failed for 'eiffel tower paint colour'" in obs[0] and "HTTP 500" in obs[0]
    assert obs[1].startswith("<tool_response>\n[ImageSearch] Error:") and "image search failed upstream" in obs[1]
    assert f"Browse error for {PAGE_URL}" in obs[2] and "HTTP 500" in obs[2]
    assert [c.error_code for c in r.tool_calls] == ["http_error", "bad_response", "http_error"]
    assert r.termination == "answer" and r.prediction["reference_images"] == []


def test_policy_failures_end_with_the_right_termination(web: FakeWeb, policy_cfg: PolicyConfig,
                                                        tools_cfg: ToolsConfig, agent_cfg: AgentConfig,
                                                        tmp_path: Path) -> None:
    r = run_http(web, policy_cfg, tools_cfg, agent_cfg, ["__CONTEXT_OVERFLOW__"], tmp_path, "overflow")
    assert r.termination == "max_response_length_exceeded" and "maximum context length" in r.prediction["error"]
    web.inject("chat", "500", "500", "500", "500", "500", "500")
    r = run_http(web, policy_cfg, tools_cfg, AgentConfig(date="2025-06-01", max_llm_calls=1),
                 [answer_with_first_image], tmp_path, "down")
    assert r.termination == "error" and "HTTP 500" in r.prediction["error"] and r.rounds == 2


# ---------------------------------------------------------------------- loop rules (local tools)


def test_invalid_format_gets_a_plain_notice_then_recovers(tmp_path: Path) -> None:
    r = run_local(["I think I will search.", answer_with_first_image], tmp_path)
    assert r.termination == "answer" and r.format_error_once
    notice = user_texts(r)[0]
    assert "invalid format" in notice and "<tool_response>" not in notice
    assert r.protocol_errors[0]["code"] == "invalid_format"


def test_truncation_notice_then_repeated_truncation_ends(tmp_path: Path) -> None:
    steps = ["<think>" + "a" * 50, "<think>" + "b" * 50]
    r = run_local(steps, tmp_path, finish=lambda t: "length")
    assert user_texts(r)[0].startswith("=== RESPONSE TOO LONG ===")
    assert r.termination == "repeated_response" and r.response_truncated_once and r.rounds == 2


def test_identical_turn_twice_is_repeated_response(tmp_path: Path) -> None:
    call = format_tool_call("search", {"queries": ["eiffel"]}, think="x")
    r = run_local([call, call + "\n"], tmp_path)
    assert r.termination == "repeated_response" and r.messages[-1].text == call


def test_budget_exhaustion_forces_a_final_answer_with_one_reference_rule(tmp_path: Path) -> None:
    def searching(messages: Sequence[Message]) -> str:
        n = sum(m.role == "assistant" for m in messages)
        if "FINAL STEP" in messages[-1].text:
            return format_answer("the first reference image", [{"img_id": "IMG_404"}, {"img_id": "IMG_001"}]) + \
                "\n<tool_call>{}</tool_call>"
        return format_tool_call("image_search", {"query": ["eiffel tower", "olympic rings", "stanley cup"][n % 3]},
                                think=f"round {n}")

    r = run_local([searching], tmp_path, AgentConfig(date="2025-06-01", max_llm_calls=3))
    assert r.rounds == 4 and r.termination == "answer"
    assert user_texts(r)[-1].startswith("=== FINAL STEP: OUTPUT ANSWER NOW ===")
    assert "<tool_call>" not in r.messages[-1].text
    assert [x["img_id"] for x in r.prediction["reference_images"]] == ["IMG_001"]
    assert [i["code"] for i in r.answer_issues] == ["unknown_img_id"]


def test_final_step_without_answer_is_no_answer(tmp_path: Path) -> None:
    call = lambda ms: format_tool_call("search", {"queries": [f"q{len(ms)}"]}, think="t")  # noqa: E731
    r = run_local([call], tmp_path, AgentConfig(date="2025-06-01", max_llm_calls=2))
    assert r.termination == "no_answer" and r.prediction == {"error": "No valid answer found"} and r.rounds == 3


def test_answer_parse_failure_stops_without_retry(tmp_path: Path) -> None:
    r = run_local(["<think>x</think><answer>{\"gen_prompt\": \"p\"}</answer>", answer_with_first_image], tmp_path)
    assert r.termination == "answer_parse_failed" and r.rounds == 1
    assert r.prediction["error"].startswith("answer_parse_failed: answer is missing 'reference_images'")


def test_dispatch_failures_use_the_spec_wordings(tmp_path: Path) -> None:
    steps = [format_tool_call("paint", {}, think="a"),
             format_tool_call("search", {"queries": 7}, think="b"),
             "<think>c</think><tool_call>\n{oops\n</tool_call>",
             format_tool_call("search", {"queries": ["eiffel"]}, think="d") + "\n<tool_response>I made this up",
             answer_with_first_image]
    r = run_local(steps, tmp_path)
    obs = user_texts(r)
    assert obs[0] == "<tool_response>\nTool paint not found. Available tools: ['search', 'image_search', 'browse']\n</tool_response>"
    assert obs[1].startswith("<tool_response>\nError calling tool search: invalid arguments for search:")
    assert obs[2].startswith("<tool_response>\n[Tool Error]: tool call is not valid JSON")
    assert "I made this up" not in r.messages[8].text and "--- search result for [eiffel] ---" in obs[3]
    assert [e["code"] for e in r.protocol_errors] == ["unknown_tool", "tool_bad_arguments", "tool_call_bad_json"]
    assert r.termination == "answer"


def test_empty_image_search_reaches_the_model_as_is(tmp_path: Path) -> None:
    r = run_local([format_tool_call("image_search", {"query": "xylophone"}, think="t"), answer_with_first_image],
                  tmp_path)
    obs = user_texts(r)[0]
    assert obs.startswith("<tool_response>\nNo usable images were found for [xylophone].")
    assert not r.messages[3].images and r.termination == "answer"


def test_policy_exceptions_never_escape(tmp_path: Path) -> None:
    class Raising:
        def __init__(self, exc: Exception):
            self.exc = exc

        async def complete(self, messages: Sequence[Message], max_tokens: int) -> PolicyReply:
            raise self.exc

    r = run_local([], tmp_path / "a", policy=Raising(PolicyLengthError("context 40000 > 36000")))
    assert r.termination == "max_response_length_exceeded"
    r = run_local([], tmp_path / "b", policy=Raising(RuntimeError("boom")))
    assert r.termination == "error" and "RuntimeError: boom" in r.prediction["error"]


# ---------------------------------------------------------------------- concurrency


def test_twenty_concurrent_episodes_keep_their_own_images(web: FakeWeb, policy_cfg: PolicyConfig,
                                                          tools_cfg: ToolsConfig, tmp_path: Path) -> None:
    subjects = [f"subject{i}" for i in range(20)]
    for s in subjects:
        stock_web(web, query=s, n=2, tag=s)

    def image_step(messages: Sequence[dict[str, Any]]) -> str:
        subject = messages[1]["content"].split()[-1]
        return format_tool_call("image_search", {"query": subject, "top_k": 2}, think="look")

    web.policy_script = http_script([image_step, answer_with_first_image])
    in_flight, peak = 0, 0

    class Counting(OpenAIChatPolicy):
        async def complete(self, messages: Sequence[Message], max_tokens: int) -> PolicyReply:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await super().complete(messages, max_tokens)
            finally:
                in_flight -= 1

    async def main() -> list[EpisodeResult]:
        async with open_toolset(tools_cfg) as tools, httpx.AsyncClient() as client:
            tasks = [Task(f"Draw {s}", task_id="same-prompt", rollout_index=i) for i, s in enumerate(subjects)]
            return await run_episodes(tasks, Counting(policy_cfg, client), tools, AgentConfig(date="2025-06-01"),
                                      tmp_path, concurrency=6)

    results = asyncio.run(main())
    assert 1 < peak <= 6
    assert len({r.directory for r in results}) == 20
    for s, r in zip(subjects, results, strict=True):
        assert r.termination == "answer"
        assert r.prediction["reference_images"][0]["title"] == f"pic {s}0"
        folder = Path(r.directory) / "images"
        for f in folder.iterdir():
            assert hashlib.sha256(f.read_bytes()).hexdigest()[:16] == f.stem  # nothing overwritten
        for img in r.images:
            assert Path(img.local_path).parent == folder and Path(img.local_path).is_file()


def test_duplicate_task_ids_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="share a"):
        asyncio.run(run_episodes([Task("a", "x"), Task("b", "x")], ScriptedPolicy([]), None,  # type: ignore[arg-type]
                                 AgentConfig(), tmp_path))


# ---------------------------------------------------------------------- secrets


def test_api_keys_never_reach_logs_or_results(web: FakeWeb, policy_cfg: PolicyConfig, agent_cfg: AgentConfig,
                                              tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stock_web(web)
    web.inject("search", "error_json", "error_json", "error_json")  # the fake echoes the key back
    events: list[str] = []
    web.policy_script = http_script(research_steps(PAGE_URL))
    tools_cfg = serper_config(web)

    async def main() -> EpisodeResult:
        async with open_toolset(tools_cfg) as tools, httpx.AsyncClient() as client:
            return await run_episode(Task("Paint the Eiffel Tower", task_id="keys"), OpenAIChatPolicy(policy_cfg, client),
                                     tools, agent_cfg, tmp_path, on_event=lambda e: events.append(repr(e)))

    with caplog.at_level(logging.DEBUG):
        r = asyncio.run(main())
    assert "Query failed for key ***" in r.tool_calls[0].error
    blobs = [caplog.text, "\n".join(events), repr(tools_cfg), repr(policy_cfg)]
    blobs += [p.read_text(errors="ignore") for p in tmp_path.rglob("*.json")]
    for key in (SERPER_KEY, *JINA_KEYS, SUMMARY_KEY, POLICY_KEY):
        for blob in blobs:
            assert key not in blob


def test_a_policy_server_echoing_the_key_does_not_leak_it(web: FakeWeb, policy_cfg: PolicyConfig,
                                                           tools_cfg: ToolsConfig, agent_cfg: AgentConfig,
                                                           tmp_path: Path) -> None:
    wrong = dataclasses.replace(policy_cfg, api_key=Secret("policy-WRONG-secret-0000"))
    r = run_http(web, wrong, tools_cfg, agent_cfg, [answer_with_first_image], tmp_path, "echo")
    assert r.termination == "error" and "invalid credentials Bearer ***" in r.prediction["error"]
    assert "policy-WRONG-secret-0000" not in (Path(r.directory) / "result.json").read_text()
