"""The built-in SFT trajectories are real agent episodes: every record passes the SFT data pipeline, every
assistant turn parses with the agent protocol, and the system prompt is the one GRPO rollouts will show."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gsjax.agent.config import ToolsConfig
from gsjax.agent.prompts import system_prompt
from gsjax.agent.protocol import parse_turn
from gsjax.agent.tools.browse import browse_schema
from gsjax.agent.tools.image_search import image_search_schema
from gsjax.agent.tools.search import search_schema
from gsjax.data import SFTDataConfig, make_sft_loader
from gsjax.data.records import read_records, to_chat
from gsjax.demo.context import DemoConfig, Layout
from gsjax.demo.pipeline import grpo_config
from gsjax.demo.trajectories import (
    DEMO_DATE,
    SFT_TEMPLATES,
    demo_agent_config,
    demo_tools_config,
    write_rl_tasks,
    write_sft_trajectories,
)
from gsjax.models.qwen3_vl.config import preset
from gsjax.processing.tokenizer import load_tokenizer
from gsjax.train.grpo_data import read_rl_records

TOOLS = {"search", "image_search", "browse"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_data")
    write_sft_trajectories(root, demo_agent_config(), demo_tools_config())
    write_rl_tasks(root)
    return root


def test_every_record_is_a_valid_sharegpt_agent_trajectory(data: Path) -> None:
    records = read_records(data / "sft.jsonl")
    assert len(records) == len(SFT_TEMPLATES) * 10 == 60  # every wording x every corpus subject
    for record in records:
        chat = to_chat(record, data)  # raises BadRecord on any rule violation
        assert all(p.is_file() for p in chat.image_paths)
        roles = [m["role"] for m in record["messages"]]
        assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
        assert record["termination"] == "answer"


def test_tool_calls_and_answers_parse_with_the_protocol(data: Path) -> None:
    used: set[str] = set()
    for record in read_records(data / "sft.jsonl"):
        turns = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        observations = [m["content"] for m in record["messages"][2:] if m["role"] == "user"]
        *calls, final = [parse_turn(t) for t in turns]
        for call, observation in zip(calls, observations):
            assert call.kind == "tool_call" and call.error is None and call.tool_call is not None
            assert call.tool_call.name in TOOLS
            used.add(call.tool_call.name)
            assert re.sub(r"^(<image>)*", "", observation).startswith("<tool_response>\n")
            assert "Error" not in observation and "No results" not in observation
        assert final.kind == "answer" and final.error is None and final.answer is not None
        issued = set(re.findall(r"^(IMG_\d{3,}): title:", "\n".join(observations), re.MULTILINE))
        refs = [r["img_id"] for r in final.answer["reference_images"]]
        assert refs and set(refs) <= issued
        assert "IMG_" not in final.answer["gen_prompt"]  # ordinals only
        assert all(t.startswith("<think>") for t in turns)
    assert used == TOOLS


def test_system_prompt_equals_the_grpo_rollouts_one(data: Path, tmp_path: Path) -> None:
    """GRPO builds its AgentConfig from env.* and ToolsConfig(backend=local): the demo must show the same text,
    in the compact style (a quarter of the full prompt's tokens)."""
    record = read_records(data / "sft.jsonl")[0]
    cfg = ToolsConfig(backend="local")
    env = grpo_config(DemoConfig(), Layout(tmp_path), "http://127.0.0.1:1").env
    agent = env.agent_config(concurrency=1)
    expected = system_prompt([search_schema(cfg), image_search_schema(cfg), browse_schema(cfg)],
                             agent.max_tool_calls_advertised, agent.max_reference_images, agent.date,
                             agent.system_prompt)
    assert agent.date == DEMO_DATE and agent.system_prompt == "compact"
    assert record["messages"][0]["content"] == expected
    tokens = len(load_tokenizer().encode(expected))
    assert tokens < 400, tokens


def test_the_sft_loader_accepts_every_record(data: Path) -> None:
    seq = DemoConfig().sft_seq_len
    cfg = SFTDataConfig(path=str(data / "sft.jsonl"), batch_size=1, buckets=(seq,), cutoff_len=seq,
                        max_pixels=65536, min_pixels=65536, shuffle=False, num_epochs=1, on_bad_record="error",
                        vision_row_buckets=(512,))
    with make_sft_loader(cfg, load_tokenizer(), preset("tiny")) as loader:
        batches = list(loader)
        assert loader.stats["skipped"] == 0 and loader.stats["valid"] == 60
    assert len(batches) == 60
    batch = batches[0]
    assert batch["input_ids"].shape == (1, seq)
    # no record is cut at the demo's one length bucket (a cut answer would teach half a tool call)
    assert max(int(b["attention_mask"].sum()) for b in batches) < seq
    assert int(batch["target_mask"].sum()) > 100  # the assistant turns are trained on


def test_rl_tasks_are_readable_by_grpo(data: Path) -> None:
    prompts, skipped = read_rl_records(data / "rl_tasks.json")
    assert len(prompts) == 10 and not skipped
    assert all(Path(p.gt_image).is_file() for p in prompts)
    assert len({p.question for p in prompts}) == 10
    rows = json.loads((data / "rl_tasks.json").read_text())
    assert {"id", "prompt", "gt_image"} <= set(rows[0])


def test_answers_copy_the_request_style_and_the_rl_wording_is_held_out(data: Path) -> None:
    """Each answer copies its request's style into gen_prompt, in six wordings (so copying, not a few styles by
    heart, is what fits them); the RL prompts use a seventh, so GRPO sees a wording SFT never showed."""
    styles = set()
    for record in read_records(data / "sft.jsonl"):
        request = record["messages"][1]["content"]
        answer = parse_turn(record["messages"][-1]["content"]).answer
        style = re.split(r" (?:of|featuring) the ", request)[0]
        assert answer["gen_prompt"].startswith(f"{style} of the "), (request, answer)
        styles.add(style)
    assert len(styles) == len(SFT_TEMPLATES) == 6
    rl_prompts = [row["prompt"] for row in json.loads((data / "rl_tasks.json").read_text())]
    assert not any(p.startswith(tuple(styles)) for p in rl_prompts)


def test_what_the_model_reads_does_not_depend_on_the_work_folder(data: Path, tmp_path: Path) -> None:
    """Image paths are shown relative to the episode folder, so the same trajectories built under another
    folder (another name length too) give the model the same text: a run's tokens are its seed's, not its
    folder's. (Before, the absolute path in every image-search result made runs in /tmp/d6 and /tmp/d7
    train on other tokens.)"""
    elsewhere = tmp_path / "a_much_longer_folder_name"
    write_sft_trajectories(elsewhere, demo_agent_config(), demo_tools_config())
    texts = [[m["content"] for m in r["messages"]] for r in read_records(data / "sft.jsonl")]
    assert texts == [[m["content"] for m in r["messages"]] for r in read_records(elsewhere / "sft.jsonl")]
    shown = re.findall(r"local_path: (\S+)", "\n".join(t for record in texts for t in record))
    assert shown and all(re.fullmatch(r"images/[0-9a-f]{16}\.jpg", p) for p in shown)
