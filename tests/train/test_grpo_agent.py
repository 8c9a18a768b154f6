"""One GRPO step through the multi-turn agent path: scripted episodes (a fake engine replies by rollout
index) with the offline corpus tools, the dual reward from the OFFLINE heuristic judges and the stand-in
generator, and a real update of the tiny Qwen3-VL preset. Checks: the trained batch carries every image
the policy saw, a zero-reward rollout stays in the loss with a negative advantage, a failed episode
(engine error) is excluded and counted by reason, and the new weights are pushed with the next version."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gsjax.agent.protocol import format_answer, format_tool_call
from gsjax.rollout.engine import EngineError, GenerationRequest
from gsjax.train import grpo as grpo_module
from gsjax.train.grpo import run_grpo
from gsjax.train.grpo_config import load_grpo_config
from tests.rollout.fakes import FakeEngine, agent_turn, turn_ids

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "grpo_tiny_cpu.yaml"
SEARCH = format_tool_call("image_search", {"query": "Eiffel Tower in Paris"}, think="find the tower")
GOOD = format_answer("The Eiffel Tower in Paris under a pale blue sky, as in the first reference.",
                     [{"img_id": "IMG_001", "note": "the Eiffel Tower"}], think="enough")
NO_REFERENCE = format_answer("A tower.", [], think="guess")


def scripted_engine(tokenizer: Any) -> FakeEngine:
    """Rollout 0 searches then answers well; 1 answers without references (reward 0); 2 hits an engine error."""
    def reply(request: GenerationRequest) -> Sequence[int]:
        _, index, turn = agent_turn(request)
        if index == 2:
            raise EngineError("the rollout server went away")
        if index == 1:
            return turn_ids(tokenizer, NO_REFERENCE)
        return turn_ids(tokenizer, SEARCH if turn == 0 else GOOD)

    return FakeEngine(reply, version="0")


@pytest.fixture
def captured_batches(monkeypatch) -> list[dict[str, Any]]:
    """Every micro-batch handed to the learner."""
    seen: list[dict[str, Any]] = []
    original = grpo_module.build_rl_batches

    def spy(*args: Any, **kwargs: Any):
        batches = original(*args, **kwargs)
        seen.extend(b for mb in batches.minibatches for b in mb)
        return batches

    monkeypatch.setattr(grpo_module, "build_rl_batches", spy)
    return seen


def test_one_agent_step_trains_on_images_keeps_zero_rewards_and_counts_failures(qwen_tokenizer, tmp_path,
                                                                                 captured_batches):
    cfg = load_grpo_config(RECIPE, [f"train.out_dir={tmp_path / 'run'}", "train.steps=1", "data.shuffle=false",
                                    "rollout.group_size=3", "rollout.prompts_per_step=1", "batch.buckets=[2048]",
                                    "batch.max_tokens_per_device=4096", "env.max_new_tokens_per_turn=256",
                                    "rollout.rollout_devices=7"])  # learner on one device: no padding rows)
    engine = scripted_engine(qwen_tokenizer)
    result = run_grpo(cfg, progress=False, engine_factory=lambda *args: engine,
                      environment=lambda eng, model_cfg, out: grpo_module.make_environment(
                          cfg, eng, model_cfg, out, tokenizer=qwen_tokenizer))
    (metrics,) = result.history
    rows = [json.loads(line) for line in (tmp_path / "run" / "rollouts" / "step000000.jsonl").read_text().splitlines()]
    good, zero, failed = rows

    # rewards: a scored answer, a policy failure worth 0 that stays in, an infrastructure failure left out
    assert good["termination"] == "answer" and good["reward"]["status"] == "scored" and good["reward"]["reward"] > 0
    assert good["tool_calls"] == 1 and good["images"] > 0 and good["weight_versions"] == ["0"]
    assert (Path(good["directory"]) / "result.json").is_file()  # the episode's full record stays on disk
    assert zero["reward"]["reward"] == 0.0 and zero["failure"] is None and zero["advantage"] < 0 < good["advantage"]
    assert failed["termination"] == "error" and failed["failure"] == "termination_error"
    assert failed["advantage"] is None
    assert metrics["excluded/termination_error"] == 1 and metrics["excluded/total"] == 1
    assert metrics["update/samples"] == 2 and metrics["reward/total_count"] == 2
    assert metrics["termination/answer"] == 2 and metrics["termination/error"] == 1
    assert metrics["episode/tool_calls_mean"] == pytest.approx(1 / 3)

    # the trained batch: exact ids with mask 1 only on sampled tokens, and all the images of the trajectory
    (batch,) = captured_batches
    rows_by_advantage = {float(a): i for i, a in enumerate(batch["advantages"]) if batch["sample_index"][i] >= 0}
    row = rows_by_advantage[max(rows_by_advantage)]
    record_ids = np.asarray(batch["input_ids"][row][batch["attention_mask"][row] > 0])
    assert int((record_ids == cfg.model.resolve().image_token_id).sum()) > 0
    assert int((np.asarray(batch["vision"]["segment_ids"]) >= 0).sum()) == metrics["update/pixel_rows"] > 0
    assert metrics["update/images"] == good["images"]
    trained = batch["target_mask"][row] > 0
    assert 0 < trained.sum() < batch["attention_mask"][row].sum() / 4  # sampled turns only, not the context

    # weights pushed after the update, tagged with the next version
    assert [version for _, version in engine.updates] == ["1"]
    assert metrics["weight_version"] == 1 and np.isfinite(metrics["update/loss"])
