"""The GRPO run end to end on the toy task (a tiny vocab-256 model on the embedded JAX sampler, reward = the
share of sampled ids in a target range): the mean reward rises clearly within 20 steps, and a run killed
with SIGKILL after its first checkpoint resumes at the right step and prompt position and ends with the
same weights as an uninterrupted run (sampling seeds depend only on (seed, step, prompt, rollout))."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from gsjax.train.checkpointing import Checkpointer, complete_steps
from gsjax.train.grpo import run_grpo
from gsjax.train.grpo_config import load_grpo_config
from gsjax.train.guards import NonFiniteTraining
from gsjax.train.metrics import read_metrics

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "grpo_tiny_cpu.yaml"


@pytest.fixture(scope="module")
def toy_hf(tmp_path_factory) -> Path:
    from gsjax.models.qwen3_vl import reference as R

    return R.build_tiny_hf(tmp_path_factory.mktemp("grpo_toy_hf"), seed=0, text={"num_hidden_layers": 2})


def toy_overrides(hf: Path, out_dir: Path, **extra: object) -> list[str]:
    base = {"model.hf_dir": hf, "model.preset": "null", "env.kind": "toy", "data.path": "null",
            "data.synthetic_prompts": 16, "train.out_dir": out_dir, "train.logits_chunk": 0,
            "rollout.group_size": 8, "rollout.prompts_per_step": 4, "rollout.max_slots": 32,
            "rollout.max_total_len": 32, "rollout.min_prefill_bucket": 16, "batch.buckets": "[16]",
            "batch.pad_id": 0, "batch.max_tokens_per_device": 4096, "optim.lr": 1e-2,
            "train.export_hf_at_end": "false", "train.checkpoint_every": 1000}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def test_mean_reward_rises_on_the_toy_task(toy_hf, tmp_path):
    cfg = load_grpo_config(RECIPE, toy_overrides(toy_hf, tmp_path / "run", **{"train.steps": 20}))
    result = run_grpo(cfg, progress=False)
    rewards = [m["reward/total_mean"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert result.final_step == 20 and len(rewards) == 20
    first, last = float(np.mean(rewards[:3])), float(np.mean(rewards[-5:]))
    assert first < 0.3 and last > first + 0.3 and last > 0.6, rewards
    # every step ran all four phases, trained zero-reward rollouts too, and pushed its weights
    history = result.history
    assert all(m["update/samples"] + m["excluded/total"] == 32 for m in history)
    assert all(m["time/rollout_s"] > 0 and m["time/update_s"] > 0 and m["time/sync_s"] > 0 for m in history)
    assert history[0]["reward/zero_frac"] > 0 and history[0]["update/samples"] > 0
    assert [m["weight_version"] for m in history] == list(range(1, 21))
    assert all(m["rollout/stale_frac"] == 0 for m in history)
    # the embedded sampler's prompt-token counters, per step (single-turn episodes: every token is prefilled)
    assert all(m["rollout/prefill_tokens"] > 0 and m["rollout/reused_prompt_tokens"] == 0 for m in history)
    # and its compiled programs: the first step compiles, later steps add at most a few new shape buckets
    compiled = [m["rollout/compiled_programs"] for m in history]
    assert compiled[0] >= 2 and sum(compiled[5:]) <= 2, compiled


def _final_params(out_dir: Path, step: int) -> dict[str, np.ndarray]:
    with Checkpointer(out_dir / "checkpoints", read_only=True) as reader:
        assert reader.latest_step() == step
    return load_file(out_dir / "hf" / "model.safetensors")


def test_kill_minus_nine_then_resume_matches_an_uninterrupted_run(toy_hf, tmp_path):
    steps = 24
    common = {"train.steps": steps, "train.checkpoint_every": 3, "train.keep_checkpoints": 2,
              "train.export_hf_at_end": "true", "train.async_checkpointing": "false"}
    straight = run_grpo(load_grpo_config(RECIPE, toy_overrides(toy_hf, tmp_path / "straight", **common)),
                        progress=False)
    assert straight.final_step == steps

    killed_dir = tmp_path / "killed"
    args = toy_overrides(toy_hf, killed_dir, **common)
    proc = subprocess.Popen([sys.executable, "-m", "gsjax.train.grpo_cli", str(RECIPE), *args, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 300
    while not complete_steps(killed_dir / "checkpoints"):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = complete_steps(killed_dir / "checkpoints")[-1]
    assert killed_at < steps, "the run finished before it could be killed"

    with Checkpointer(killed_dir / "checkpoints", read_only=True) as reader:
        assert reader.saved_config(killed_at)["env"]["kind"] == "toy"
    resumed = run_grpo(load_grpo_config(RECIPE, args), progress=False)
    assert resumed.resumed_from == killed_at and resumed.final_step == steps
    assert len(resumed.history) == steps - killed_at
    # the prompt position was restored: the resumed steps saw the same rewards as the uninterrupted run's
    np.testing.assert_allclose([m["reward/total_mean"] for m in resumed.history],
                               [m["reward/total_mean"] for m in straight.history[killed_at:]], atol=1e-6)
    logged = [m["step"] for m in read_metrics(killed_dir / "metrics.jsonl")]
    assert logged == sorted(set(logged)) and logged[-1] == steps
    a, b = _final_params(tmp_path / "straight", steps), _final_params(killed_dir, steps)
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    assert worst <= 1e-5, worst


def test_a_non_finite_update_stops_before_the_weights_are_pushed_or_saved(toy_hf, tmp_path):
    """lr 1e30: update 1 is finite but overflows the weights, so update 2's loss is not. The run stops there,
    before step 2 pushes, logs or saves anything: only step 1 is checkpointed and logged."""
    cfg = load_grpo_config(RECIPE, toy_overrides(toy_hf, tmp_path / "run", **{
        "train.steps": 3, "train.checkpoint_every": 1, "optim.lr": 1e30}))
    with pytest.raises(NonFiniteTraining, match=r"update 2 gave non-finite loss=") as caught:
        run_grpo(cfg, progress=False)
    assert caught.value.step == 2
    assert complete_steps(tmp_path / "run" / "checkpoints") == [1]
    steps = [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1]


def test_minibatches_and_micro_batch_accumulation_with_rollout_old_logprobs(toy_hf, tmp_path):
    """Two optimizer updates per step, each accumulated over several micro-batches (one row per device)."""
    cfg = load_grpo_config(RECIPE, toy_overrides(toy_hf, tmp_path / "run", **{
        "train.steps": 2, "batch.num_minibatches": 2, "batch.max_tokens_per_device": 16,
        "advantage.old_logprobs": "rollout", "loss.tis_cap": 2.0}))
    history = run_grpo(cfg, progress=False).history
    for m in history:
        assert m["update/minibatches"] == 2 and m["update/micro_batches"] >= 4, m
        assert np.isfinite(m["update/loss"]) and m["update/grad_norm"] > 0
        # per-token PPO statistics flow out of the jitted loss through accumulation
        assert 0 <= m["policy/pg_clipfrac"] <= 1 and np.isfinite(m["policy/ppo_kl"])
        assert m["policy/ratio_max"] > 0 and np.isfinite(m["policy/rollout_mismatch/abs_mean"])
        # the second mini-batch of a step is off-policy: its ratio is not identically 1
        assert m["policy/ratio_max"] != 1.0
    assert history[-1]["weight_version"] == 2
