"""GRPO config (recipes, upstream defaults, overrides, errors naming the key), the prompt stream's resumable
position, RL record reading, and the exclusion rules of a rollout (no model, no JAX programs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gsjax.agent.engine_policy import TokenRecord, TurnRecord
from gsjax.rewards.dual import EpisodeReward
from gsjax.train.grpo_config import GRPOConfig, GRPOConfigError, load_grpo_config
from gsjax.train.grpo_data import Prompt, PromptStream, corpus_prompts, read_rl_records
from gsjax.train.grpo_metrics import group_metrics, summary_metrics
from gsjax.train.rollout_phase import NO_RECORD, Rollout, derive_seed

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["grpo_tiny_cpu", "grpo_qwen3vl_8b_gpu", "grpo_tpu_pod"])
def test_recipes_load_and_round_trip(name):
    cfg = load_grpo_config(CONFIGS / f"{name}.yaml")
    assert GRPOConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_the_8b_recipe_carries_upstream_settings():
    cfg = load_grpo_config(CONFIGS / "grpo_qwen3vl_8b_gpu.yaml")
    assert (cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.batch.num_minibatches) == (6, 8, 1)
    optim = cfg.optim
    assert (optim.lr, optim.weight_decay, optim.schedule, optim.grad_clip) == (1e-6, 0.01, "constant", 1.0)
    assert (cfg.loss.clip_ratio_low, cfg.loss.clip_ratio_high, cfg.loss.clip_ratio_c) == (0.2, 0.28, 3.0)
    assert cfg.loss.loss_agg_mode == "seq-mean-token-sum" and cfg.loss.kl_coef == 0 and cfg.loss.entropy_coef == 0
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (0.7, 0.95, -1)
    assert (cfg.reward.mode, cfg.reward.text_coef, cfg.train.epochs, cfg.train.checkpoint_every) == ("dual", 0.5, 5, 20)
    assert cfg.batch.max_tokens_per_device == 37000 and cfg.data.seed == 42


def test_defaults_are_upstream_and_sections_given_in_yaml_keep_grpo_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lr: 2.0e-6}\ntrain: {steps: 3}\ndata: {path: x.json}\n")
    cfg = load_grpo_config(recipe)
    assert cfg.optim.lr == 2e-6 and cfg.optim.weight_decay == 0.01 and cfg.optim.schedule == "constant"
    assert cfg.train.steps == 3 and cfg.train.checkpoint_every == 20


def test_overrides_are_typed_and_errors_name_the_key():
    cfg = load_grpo_config(None, ["env.kind=toy", "rollout.group_size=8", "loss.clip_ratio_c=null",
                                  "batch.buckets=[64,128]", "reward.generator_urls=[http://a:1,http://b:2]"])
    assert cfg.rollout.group_size == 8 and cfg.loss.clip_ratio_c is None and cfg.batch.buckets == (64, 128)
    assert cfg.reward.generator_urls == ("http://a:1", "http://b:2")
    with pytest.raises(GRPOConfigError, match="clip_ratio_c"):
        load_grpo_config(None, ["env.kind=toy", "loss.clip_ratio_c=0.5"])
    with pytest.raises(GRPOConfigError, match="data.path is required"):
        load_grpo_config(None, [])
    with pytest.raises(GRPOConfigError, match="grad_accum"):
        load_grpo_config(None, ["env.kind=toy", "train.grad_accum=2"])
    with pytest.raises(Exception, match="rollout.grup_size"):
        load_grpo_config(None, ["env.kind=toy", "rollout.grup_size=3"])


def test_prompt_stream_resumes_at_the_saved_position_and_drops_partial_batches():
    prompts = [Prompt(str(i), f"q{i}") for i in range(10)]
    stream = PromptStream(prompts, 3, shuffle=True, seed=42)
    assert stream.steps_per_epoch == 3
    taken = [stream.next_batch() for _ in range(2)]
    state = stream.get_state()
    later = [stream.next_batch() for _ in range(3)]
    resumed = PromptStream(prompts, 3, shuffle=True, seed=42)
    resumed.set_state(state)
    assert [resumed.next_batch() for _ in range(3)] == later
    assert stream.epoch == 1 and len({p.id for b in taken + later[:1] for p in b}) == 9  # one epoch, no repeats
    assert [p.id for p in PromptStream(prompts, 3, shuffle=False).next_batch()] == ["0", "1", "2"]


def test_rl_records_skip_and_count_items_without_a_field_or_image(tmp_path):
    (tmp_path / "gt.png").write_bytes(b"png")
    items = [{"id": 1, "prompt": "draw a", "gt_image": "gt.png"}, {"id": 2, "prompt": "draw b"},
             {"id": 3, "question": "draw c", "gt_image": "missing.png"}]
    (tmp_path / "rl.json").write_text(json.dumps(items))
    prompts, skipped = read_rl_records(tmp_path / "rl.json")
    assert prompts == [Prompt("1", "draw a", str(tmp_path / "gt.png"))]
    assert skipped == {"missing_field": 1, "image_missing": 1}
    corpus = corpus_prompts()
    assert len(corpus) == 10 and all(Path(p.gt_image).is_file() for p in corpus)


def _record(sampled: int) -> TokenRecord:
    record = TokenRecord()
    record.extend([1, 2, 3], 0)
    record.extend(list(range(10, 10 + sampled)), 1, [-0.5] * sampled)
    record.turns.append(TurnRecord(0, 3, sampled, sampled, "stop", "4", ("3", "4"), "r", 0.0, False, False))
    return record


def test_rollout_failures_are_reasons_and_zero_rewards_are_not():
    prompt = Prompt("p", "q")
    scored = Rollout(prompt, 0, _record(4), "answer", reward=EpisodeReward(0.6, "scored", "ok", 0.4, 0.8))
    zero = Rollout(prompt, 1, _record(2), "no_answer", reward=EpisodeReward(0.0, "zero", "termination:no_answer"))
    failed = Rollout(prompt, 2, _record(2), "answer",
                     reward=EpisodeReward(None, "missing", "generation_failed:TimeoutError"))
    tool_error = Rollout(prompt, 3, None, "error", reward=EpisodeReward(None, "missing", "termination:error"))
    empty = Rollout(prompt, 4, None, "answer", reward=EpisodeReward(0.0, "zero", "no_prediction"))
    assert [r.failure for r in (scored, zero, failed, tool_error, empty)] == [
        None, None, "generation_failed", "termination_error", NO_RECORD]
    metrics = summary_metrics([r.summary() for r in (scored, zero, failed, tool_error)], version="4")
    assert metrics["reward/total_mean"] == pytest.approx(0.3) and metrics["reward/total_count"] == 2
    assert metrics["reward/image_mean"] == pytest.approx(0.4) and metrics["reward/text_mean"] == pytest.approx(0.8)
    assert metrics["termination/answer"] == 2 and metrics["termination/error"] == 1
    assert metrics["rollout/stale_frac"] == 1.0  # every turn list includes the older version "3"
    assert scored.weight_versions == ("3", "4")
    assert group_metrics([0.6, 0.0, None, 1.0, 1.0], ["a", "a", "a", "b", "b"]) == {
        "groups/total": 2.0, "groups/with_signal": 1.0}
    assert derive_seed(0, 1, "p", 2) == derive_seed(0, 1, "p", 2) != derive_seed(0, 1, "p", 3)
