"""Multi-host SFT: two processes of two CPU devices each (a real `jax.distributed` job over loopback) train
the same global batches as one process of four devices, to the same losses and the same exported weights.

Each host loads only its own rows (images included); the learner assembles the global batch from them and
gathers every host's image rows in global row order, so a wrong placement would change the loss."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from gsjax.data.synthetic import SyntheticSpec, write_synthetic_sft
from gsjax.demo.services import free_port
from gsjax.train.metrics import read_metrics

from ..subprocess_env import xla_flags

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "sft_tiny_cpu.yaml"
STEPS = 3


def sft_command(records: Path, out_dir: Path, batch_per_host: int) -> list[str]:
    overrides = {"data.path": records, "data.image_root": records.parent, "train.out_dir": out_dir,
                 "data.batch_size": batch_per_host, "data.num_epochs": 4, "data.buckets": "[384]",
                 "data.cutoff_len": 384, "train.steps": STEPS, "train.checkpoint_every": 100,
                 "train.export_hf_at_end": "true", "optim.lr": 1e-2, "optim.schedule": "constant",
                 "optim.warmup_ratio": 0.0}
    return [sys.executable, "-m", "gsjax.cli", "sft", str(RECIPE), *[f"{k}={v}" for k, v in overrides.items()],
            "--no-progress"]


def launch(command: list[str], devices: int, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "XLA_FLAGS": xla_flags(devices), **env}
    return subprocess.Popen(command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen]) -> None:
    try:
        outputs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    # every tool response carries images; with this seed both hosts' rows hold some in each of the 3 steps,
    # so the order in which the hosts' image rows are joined decides the loss
    spec = SyntheticSpec(image_fraction=1.0, max_tool_rounds=1, words=(4, 16), image_side=(16, 64))
    return write_synthetic_sft(tmp_path_factory.mktemp("multihost_data"), 12, seed=2, spec=spec)


@pytest.mark.slow
def test_two_hosts_train_like_one_host_with_the_same_devices(records, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    procs = [launch(sft_command(records, single, batch_per_host=4), devices=4)]
    address = f"127.0.0.1:{free_port()}"
    procs += [launch(sft_command(records, multi, batch_per_host=2), devices=2, JAX_COORDINATOR_ADDRESS=address,
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
    finish(procs)

    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(multi / "metrics.jsonl")
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]  # the same records, split over two hosts
        np.testing.assert_allclose([b["loss"], b["grad_norm"]], [a["loss"], a["grad_norm"]], rtol=2e-5)
    assert one[-1]["loss"] < one[0]["loss"]
    # only process 0 exported, after every host took part in gathering the sharded weights
    weights_one, weights_two = load_file(single / "hf" / "model.safetensors"), load_file(multi / "hf" /
                                                                                         "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    # three Adam steps at lr 1e-2 move weights by up to 3e-2; where a gradient is near zero Adam's 1/sqrt(v)
    # turns summation-order rounding into ~1e-5 of movement (seen: lm_head 4e-5, elsewhere < 1e-5)
    for name in weights_one:
        diff = float(np.abs(weights_two[name] - weights_one[name]).max())
        assert diff < 1e-4, (name, diff)
