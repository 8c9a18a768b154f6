"""Multi-host GRPO: two processes of two CPU devices each (a real `jax.distributed` job over loopback), each
sampling its own half of every step's prompt groups on its own embedded sampler, train like one process of
four devices: the same rewards per step, the same losses, the same final weights.

The toy task (reward = share of sampled ids in a target range) keeps episodes single-turn and fast. The two
hosts' batches differ (each holds only its own groups' rows), so the shapes they agree on, the denominator
counts and the gathered step metrics all have to be right for the run to match. One mini-batch per step:
with several, each host splits its own samples (test_rl_batch covers that), so the mini-batches would hold
other samples than a one-host run's.

The second test takes the multi-turn agent path (offline tools, rewards and stand-in generator) on a scripted
engine (grpo_agent_hosts): the hosts' trajectories carry different images, so it checks the joined vision
input of the update (reversing the hosts' image order in `global_vision` fails it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from gsjax.demo.services import free_port
from gsjax.train.metrics import read_metrics

from .test_grpo_run import RECIPE, toy_overrides
from .test_sft_multihost import finish, launch

STEPS = 3


@pytest.fixture(scope="module")
def toy_hf(tmp_path_factory) -> Path:
    from gsjax.models.qwen3_vl import reference as R

    return R.build_tiny_hf(tmp_path_factory.mktemp("grpo_multihost_hf"), seed=0, text={"num_hidden_layers": 2})


def grpo_command(hf: Path, out_dir: Path) -> list[str]:
    import sys

    overrides = toy_overrides(hf, out_dir, **{"train.steps": STEPS, "train.export_hf_at_end": "true",
                                              "rollout.prompts_per_step": 4, "rollout.group_size": 4,
                                              "batch.max_tokens_per_device": 32})  # 2 micro-batches per update
    return [sys.executable, "-m", "gsjax.train.grpo_cli", str(RECIPE), *overrides, "--no-progress"]


@pytest.mark.slow
def test_two_hosts_train_like_one_host_with_the_same_devices(toy_hf, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    procs = [launch(grpo_command(toy_hf, single), devices=4)]
    address = f"127.0.0.1:{free_port()}"
    procs += [launch(grpo_command(toy_hf, multi), devices=2, JAX_COORDINATOR_ADDRESS=address,
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
    finish(procs)

    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(multi / "metrics.jsonl")
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        # every host's rollouts are in the step's metrics: 4 groups of 4, the same samples drawn
        assert b["rollouts"] == a["rollouts"] == 16 and b["update/samples"] == a["update/samples"]
        assert a["update/micro_batches"] >= 2 and b["update/micro_batches"] >= 2  # accumulation on both sides
        for key in ("reward/total_mean", "reward/total_std", "groups/with_signal", "rollout/sampled_tokens",
                    "rollout/prefill_tokens", "update/trained_tokens", "update/minibatches"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
        np.testing.assert_allclose([b["update/loss"], b["update/grad_norm"]], [a["update/loss"], a["update/grad_norm"]],
                                   rtol=1e-4, atol=1e-6)
    # process 0 logged every host's episodes
    logged = [json.loads(line) for line in (multi / "rollouts" / "step000001.jsonl").read_text().splitlines()]
    assert len(logged) == 16 and len({r["group_id"] for r in logged}) == 4
    weights_one, weights_two = (load_file(d / "hf" / "model.safetensors") for d in (single, multi))
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        diff = float(np.abs(weights_two[name] - weights_one[name]).max())
        assert diff < 1e-4, (name, diff)


AGENT_STEPS = 1  # one update shows the joined image rows; each step costs ~20 s of the 2-core CI


def agent_command(out_dir: Path) -> list[str]:
    """The multi-turn agent path with the offline tools and rewards on a scripted engine (grpo_agent_hosts)."""
    import sys

    overrides = {"train.out_dir": out_dir, "train.steps": AGENT_STEPS, "train.export_hf_at_end": "true",
                 "train.checkpoint_every": 1000, "data.shuffle": "false", "rollout.group_size": 4,
                 "rollout.prompts_per_step": 2, "env.max_llm_calls": 3, "env.max_new_tokens_per_turn": 256,
                 "env.system_prompt": "compact", "batch.buckets": "[1024]",
                 "batch.max_tokens_per_device": 1024}  # one row per device: several micro-batches per host
    return [sys.executable, "-m", "tests.train.grpo_agent_hosts", str(RECIPE),
            *[f"{k}={v}" for k, v in overrides.items()]]


@pytest.mark.slow
def test_two_hosts_train_on_their_own_trajectory_images_like_one_host(tmp_path):
    """Each host's groups carry other numbers of images (0-2 image searches per episode), so the hosts'
    micro-batches need different vision rows and the joined image rows must follow the global row order."""
    # other folders, the same tokens: the policy reads image paths relative to its episode folder
    single, multi = tmp_path / "single", tmp_path / "multi"
    root = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [launch(agent_command(single), devices=4, **root)]
    address = f"127.0.0.1:{free_port()}"
    procs += [launch(agent_command(multi), devices=2, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                     JAX_PROCESS_ID=str(i), **root) for i in range(2)]
    finish(procs)

    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(multi / "metrics.jsonl")
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, AGENT_STEPS + 1))
    for a, b in zip(one, two):
        assert b["rollouts"] == a["rollouts"] == 8
        for key in ("reward/total_mean", "reward/total_std", "update/samples", "update/images", "update/pixel_rows",
                    "excluded/total", "episode/tool_calls_mean", "update/trained_tokens"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
        assert a["update/images"] > 0 and a["update/micro_batches"] >= 2 and b["update/micro_batches"] >= 2
        np.testing.assert_allclose([b["update/loss"], b["update/grad_norm"]], [a["update/loss"], a["update/grad_norm"]],
                                   rtol=1e-4, atol=1e-6)
    assert one[0]["excluded/total"] == 1  # corpus0's failing rollout, on host 0
    # the premise: the two hosts' groups (one each per step) trained different numbers of images
    for step in range(AGENT_STEPS):
        logged = [json.loads(line) for line in (multi / "rollouts" / f"step{step:06d}.jsonl").read_text().splitlines()]
        per_group: dict[str, int] = {}
        for r in (r for r in logged if r["advantage"] is not None):
            per_group[r["group_id"]] = per_group.get(r["group_id"], 0) + r["images"]
        assert len(per_group) == 2 and len(set(per_group.values())) == 2, per_group
    weights_one, weights_two = (load_file(d / "hf" / "model.safetensors") for d in (single, multi))
    # at the first step the loss is the same whatever the pixels (ratio 1): the gradient tells, and Adam's first
    # step moves a weight by up to 1e-4 (the lr) either way, so the hosts' images in the wrong order change
    # weights by ~2e-4, while equal runs differ by ~3e-8
    for name in weights_one:
        diff = float(np.abs(weights_two[name] - weights_one[name]).max())
        assert diff < 1e-6, (name, diff)
