"""gsjax's agent as the default runner of `gsjax eval knowgen|wise run`, against loopback fakes of the
policy server, Serper and the image hosts (or the offline corpus)."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from gsjax.agent.protocol import format_answer, format_tool_call
from gsjax.eval.agent_runner import AgentConfigError, AgentEpisodeRunner, check_credentials, load_run_config
from gsjax.eval.cli import eval_app
from gsjax.eval.records import BenchmarkItem
from tests.agent.fakes import FAST_RETRY, POLICY_KEY, SERPER_KEY, FakeWeb, issued_ids, make_jpeg, step_text
from tests.rewards.fake_servers import png_bytes

FAST = dataclasses.asdict(FAST_RETRY)
GOOD_PROMPTS = ("Draw the Eiffel Tower at dusk", "garbage: a festival poster", "Draw the Eiffel Tower in winter")


class Policy:
    """Fake policy: image_search, then an answer naming the prompt and the first image; prompts
    starting with 'garbage' get unparseable turns while `garbage` is on."""

    def __init__(self, query: str = "eiffel tower") -> None:
        self.query, self.garbage = query, True

    def __call__(self, messages: list[dict[str, Any]], payload: dict[str, Any]) -> tuple[str, str]:
        prompt = messages[1]["content"]
        if self.garbage and prompt.startswith("garbage"):
            return "Sure! Here is some prose with no tool call and no answer.", "stop"
        steps = [format_tool_call("image_search", {"query": self.query}, think="look"),
                 lambda ms: self.answer(prompt, ms)]
        return step_text(steps, messages), "stop"

    @staticmethod
    def answer(prompt: str, messages: Sequence[Any]) -> str:
        return format_answer(f"grounded: {prompt}", [{"img_id": issued_ids(messages)[0], "note": "subject"}])


def serper_config(tmp_path: Path, web: FakeWeb, **extra: Any) -> Path:
    """An agent config for the fakes; keys only through (renamed) environment variables."""
    cfg = {
        "policy": {"base_url": f"{web.base}/v1", "model": "fake-policy", "api_key_env": "TEST_POLICY_KEY",
                   "retry": FAST},
        "agent": {"max_llm_calls": 3, "date": "2025-06-01"},
        "tools": {"backend": "serper", "serper_key_env": "TEST_SERPER_KEY", "allow_private_urls": True,
                  "text_search_url": f"{web.base}/serper/search", "image_search_url": f"{web.base}/serper/images",
                  "jina_base_url": f"{web.base}/jina", "retry": FAST, "download_retry": FAST,
                  "tool_deadline_s": 10.0},
        **extra,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def fake_world(web: FakeWeb, monkeypatch: pytest.MonkeyPatch) -> FakeWeb:
    monkeypatch.setenv("TEST_POLICY_KEY", POLICY_KEY)
    monkeypatch.setenv("TEST_SERPER_KEY", SERPER_KEY)
    web.image_items["eiffel tower"] = [{"title": f"tower {i}", "imageUrl": web.host_image(f"t{i}.jpg", make_jpeg(i)),
                                        "link": f"https://example.com/t{i}"} for i in range(2)]
    return web


def knowgen_bench(tmp_path: Path) -> Path:
    (tmp_path / "gt").mkdir()
    rows = []
    for i, (prompt, category) in enumerate(zip(GOOD_PROMPTS, ("architecture", "posters", "history"))):
        (tmp_path / "gt" / f"{i}.png").write_bytes(png_bytes((40 * i, 0, 0)))
        rows.append({"id": i, "prompt": prompt, "meta": {"category": category, "difficulty": "easy"},
                     "gt_image": f"gt/{i}.png"})
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def results(out: Path) -> dict[str, dict]:
    return {str(r["id"]): r for r in json.loads((out / "results.json").read_text())}


def test_knowgen_run_uses_the_agent_by_default(fake_world: FakeWeb, tmp_path: Path) -> None:
    policy = Policy()
    fake_world.policy_script = policy
    args = ["knowgen", "run", "--benchmark", str(knowgen_bench(tmp_path)), "--out", str(tmp_path / "run"),
            "--runner-config", str(serper_config(tmp_path, fake_world)), "--workers", "3"]
    res = CliRunner().invoke(eval_app, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "run"
    rows = results(out)
    for key in ("0", "2"):
        row = rows[key]
        assert row["termination"] == "answer" and "error" not in row
        assert row["gen_prompt"] == f"grounded: {GOOD_PROMPTS[int(key)]}"
        ref = row["reference_images"][0]
        assert ref["img_id"] == "IMG_001" and ref["note"] == "subject" and ref["title"] == "tower 0"
        assert Path(ref["local_path"]) == (out / "ref_images" / f"{key}_IMG_001.jpg").resolve()
        with Image.open(ref["local_path"]) as img:
            assert img.size == (96, 80)
        roles = [m["role"] for m in row["trajectory_messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant"]
        shown = row["trajectory_messages"][3]["images"]
        assert len(shown) == 2 and all(Path(p).is_file() and str(out / "episodes") in p for p in shown)
        assert json.loads((out / "episodes" / f"{key}_0" / "result.json").read_text())["termination"] == "answer"
    bad = rows["1"]
    assert bad["termination"] == "repeated_response" and bad["error"].startswith("repeated_response")
    assert bad["gen_prompt"] == "" and bad["reference_images"] == []
    saved = (out / "agent_config.json").read_text()
    assert json.loads(saved)["tools"]["serper_key"] == "<set>"
    assert POLICY_KEY not in saved + (out / "results.json").read_text()
    assert SERPER_KEY not in saved + (out / "results.json").read_text()

    # Rerun: answered samples are kept as they are, the failed one runs again in a fresh folder.
    policy.garbage = False
    calls = fake_world.count("chat")
    res = CliRunner().invoke(eval_app, args)
    assert res.exit_code == 0, res.output
    assert fake_world.count("chat") - calls == 2
    again = results(out)
    assert all(r["termination"] == "answer" for r in again.values())
    assert again["0"] == rows["0"] and again["2"] == rows["2"]
    assert again["1"]["reference_images"][0]["local_path"].endswith("1_IMG_001.jpg")
    assert (out / "episodes" / "1_0").is_dir() and (out / "episodes" / "1_1" / "result.json").is_file()
    assert not [t for t in threading.enumerate() if t.name == "gsjax-agent-loop"]  # each run closed its loop


def test_wise_run_with_the_offline_corpus_and_a_tool_cache(web: FakeWeb, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_POLICY_KEY", POLICY_KEY)
    web.policy_script = Policy(query="golden gate bridge orange")
    data = tmp_path / "wise"
    data.mkdir()
    (data / "natural_science.json").write_text(json.dumps(
        [{"prompt_id": pid, "Prompt": f"Paint the bridge, take {pid}", "Explanation": "e", "Subcategory": "s"}
         for pid in (701, 801)]))
    cfg = tmp_path / "agent.json"
    cfg.write_text(json.dumps({
        "policy": {"base_url": f"{web.base}/v1", "model": "fake-policy", "api_key_env": "TEST_POLICY_KEY",
                   "retry": FAST},
        "tools": {"backend": "local"},
        "cache": {"dir": str(tmp_path / "cache"), "mode": "record"},
        "episodes_dir": str(tmp_path / "episodes")}))
    res = CliRunner().invoke(eval_app, ["wise", "run", "--data", str(data), "--out", str(tmp_path / "run"),
                                        "--runner-config", str(cfg), "--workers", "2"])
    assert res.exit_code == 0, res.output
    rows = results(tmp_path / "run")
    assert sorted(rows) == ["701", "801"]
    assert all(r["termination"] == "answer" and r["reference_images"][0]["title"] == "Golden Gate Bridge"
               for r in rows.values())
    assert rows["701"]["meta"] == {"category": "biology", "subcategory": "s"}
    assert (tmp_path / "episodes" / "701_0" / "result.json").is_file()
    assert list((tmp_path / "cache" / "entries").rglob("*.json"))


def test_episodes_ending_in_error_are_retried_in_process(fake_world: FakeWeb, tmp_path: Path) -> None:
    fake_world.policy_script = Policy()
    item = BenchmarkItem("a/b", GOOD_PROMPTS[0])
    runner = AgentEpisodeRunner(load_run_config(serper_config(tmp_path, fake_world)))
    with pytest.raises(RuntimeError, match="set_output_dir"):
        runner(item)
    runner.set_output_dir(tmp_path / "out")
    with runner:
        fake_world.inject("chat", "500", "500", "500")  # the policy call of attempt 0 fails after its retries
        outcome = runner(item)
    assert outcome.termination == "answer" and outcome.gen_prompt == f"grounded: {GOOD_PROMPTS[0]}"
    first, second = sorted((tmp_path / "out" / "episodes").iterdir())
    assert json.loads((first / "result.json").read_text())["termination"] == "error"
    assert second.name.endswith("_1") and json.loads((second / "result.json").read_text())["termination"] == "answer"

    no_retry = AgentEpisodeRunner(load_run_config(serper_config(tmp_path, fake_world, episode_retries=0)))
    no_retry.set_output_dir(tmp_path / "out2")
    with no_retry:
        fake_world.inject("chat", "500", "500", "500")
        failed = no_retry(item)
    assert failed.termination == "error" and failed.error.startswith("error: policy call failed")


def test_config_layers_env_under_file_and_keeps_keys_out(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("policy:\n  base_url: http://file/v1\n  temperature: 1\n  api_key_env: MY_KEY\n"
                    "agent:\n  date: 2025-06-01\n  max_llm_calls: 4\ntools:\n  backend: local\n"
                    "cache:\n  dir: c\n")
    env = {"GSJAX_POLICY_URL": "http://env/v1", "GSJAX_POLICY_MODEL": "env-model", "MY_KEY": "sk-mine",
           "MAX_LLM_CALL_PER_RUN": "7"}
    cfg = load_run_config(path, env)
    assert (cfg.policy.base_url, cfg.policy.model, cfg.policy.temperature) == ("http://file/v1", "env-model", 1.0)
    assert cfg.policy.api_key.reveal() == "sk-mine" and cfg.agent.date == "2025-06-01"
    assert cfg.agent.max_llm_calls == 4 and cfg.cache_mode == "replay-or-record" and cfg.episode_retries == 2
    assert load_run_config(None, {"MAX_LLM_CALL_PER_RUN": "7"}).agent.max_llm_calls == 7
    path.write_text("cache:\n  dir: c\n  mode: off\n")  # YAML 1.1 reads a bare `off` as false
    assert load_run_config(path, {}).cache_mode == "off"

    bad = {"tools:\n  serper_kee: x\n": "tools.serper_kee: unknown setting",
           "policy:\n  api_key: sk-LEAKED\n": "policy.api_key: API keys are read from environment variables",
           "agent:\n  max_llm_calls: nine\n": "agent.max_llm_calls: expected int",
           "agent:\n  max_llm_calls: 0\n": "max_llm_calls must be >= 1",
           "cache:\n  mode: replay\n": "cache.mode replay needs cache.dir",
           "polcy: {}\n": "unknown top-level key"}
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(AgentConfigError, match=message) as info:
            load_run_config(path, {})
        assert str(path) in str(info.value) and "sk-LEAKED" not in str(info.value)


def test_a_web_run_without_a_serper_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERPER_KEY_ID", raising=False)
    with pytest.raises(AgentConfigError, match="SERPER_KEY_ID"):
        check_credentials(load_run_config(None))
    replay = tmp_path / "replay.yaml"
    replay.write_text(f"cache:\n  dir: {tmp_path / 'cache'}\n  mode: replay\n")
    check_credentials(load_run_config(replay))  # replaying a recorded run needs no key

    res = CliRunner().invoke(eval_app, ["knowgen", "run", "--benchmark", str(knowgen_bench(tmp_path)),
                                        "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "SERPER_KEY_ID" in res.output
    assert not (tmp_path / "run" / "results.json").exists()


def test_shipped_agent_eval_config_loads():
    path = Path(__file__).resolve().parents[2] / "configs" / "agent_eval.yaml"
    cfg = load_run_config(path, env={})
    assert cfg.policy.base_url == "http://127.0.0.1:8001/v1"
    assert cfg.tools.backend == "serper"
