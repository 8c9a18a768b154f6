"""The SFT run end to end: the loss falls on a handful of records, a kill -9 mid-run resumes to the
same params as an uninterrupted run, and `gsjax export` writes a directory transformers loads."""

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
from typer.testing import CliRunner

from gsjax.cli import app
from gsjax.data.synthetic import SyntheticSpec, write_synthetic_sft
from gsjax.train.checkpointing import complete_steps
from gsjax.train.config import load_config
from gsjax.train.guards import NonFiniteTraining, check_finite
from gsjax.train.metrics import read_metrics
from gsjax.train.sft import run_sft

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "sft_tiny_cpu.yaml"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    spec = SyntheticSpec(max_tool_rounds=1, words=(4, 16), image_side=(16, 96))
    return write_synthetic_sft(tmp_path_factory.mktemp("sft_data"), 12, seed=3, spec=spec)


def overrides(records: Path, out_dir: Path, **extra) -> list[str]:
    base = {"data.path": records, "data.image_root": records.parent, "train.out_dir": out_dir,
            "data.batch_size": 8, "data.num_epochs": 20,
            "data.buckets": "[128,256]", "data.cutoff_len": 256, "train.log_every": 1}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def test_loss_falls_when_overfitting_a_few_records(records, tmp_path):
    cfg = load_config(RECIPE, overrides(records, tmp_path / "run", **{
        "train.steps": 24, "train.checkpoint_every": 100, "train.export_hf_at_end": "false",
        "optim.lr": 1e-2, "optim.schedule": "constant", "optim.warmup_ratio": 0.0}))
    result = run_sft(cfg, progress=False)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert result.final_step == 24 and len(losses) == 24
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses
    assert result.data_stats["valid"] > 0


def test_a_non_finite_update_stops_the_run_before_it_is_checkpointed(records, tmp_path):
    """A learning rate of 1e30 makes update 1's weights overflow, so update 2's loss is not finite. Update 2 is
    not a logging step (log_every 100) but a checkpoint step: the run stops there and saves nothing."""
    cfg = load_config(RECIPE, overrides(records, tmp_path / "run", **{
        "train.steps": 4, "train.checkpoint_every": 2, "train.log_every": 100, "train.export_hf_at_end": "false",
        "optim.lr": 1e30, "optim.schedule": "constant", "optim.warmup_ratio": 0.0}))
    with pytest.raises(NonFiniteTraining, match=r"update 2 gave non-finite loss=.*; its state was not saved\. L") \
            as caught:
        run_sft(cfg, progress=False)
    assert caught.value.step == 2 and caught.value.last_checkpoint is None
    assert complete_steps(tmp_path / "run" / "checkpoints") == []


def test_check_finite_names_each_bad_figure_and_ignores_absent_ones():
    check_finite(3, {"loss": 1.5, "grad_norm": 0.2, "tokens": float("nan")})  # only loss and grad_norm count
    check_finite(3, {})
    with pytest.raises(NonFiniteTraining, match=r"update 7 gave non-finite grad_norm=inf;.*step 6") as caught:
        check_finite(7, {"loss": 2.0, "grad_norm": float("inf")}, last_checkpoint=6)
    assert caught.value.values == {"grad_norm": float("inf")}


def _exported(directory: Path) -> dict[str, np.ndarray]:
    return load_file(directory / "model.safetensors")


@pytest.mark.slow
def test_kill_minus_nine_then_resume_matches_an_uninterrupted_run(records, tmp_path):
    common = {"train.steps": 6, "train.checkpoint_every": 2, "train.keep_checkpoints": 2,
              "train.export_hf_at_end": "true"}
    straight = load_config(RECIPE, overrides(records, tmp_path / "straight", **common))
    run_sft(straight, progress=False)

    killed_dir = tmp_path / "killed"
    args = overrides(records, killed_dir, **common)
    proc = subprocess.Popen([sys.executable, "-m", "gsjax.cli", "sft", str(RECIPE), *args, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 600
    while not complete_steps(killed_dir / "checkpoints"):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = complete_steps(killed_dir / "checkpoints")[-1]
    assert killed_at < 6, "the run finished before it could be killed"

    resumed = run_sft(load_config(RECIPE, args), progress=False)
    assert resumed.resumed_from == killed_at and resumed.final_step == 6
    steps = [m["step"] for m in read_metrics(killed_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # no duplicated or torn metric lines
    a, b = _exported(tmp_path / "straight" / "hf"), _exported(killed_dir / "hf")
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    assert worst <= 1e-6, worst


def test_export_cli_writes_a_directory_transformers_loads(records, tmp_path):
    import torch

    from gsjax.models.qwen3_vl import reference as R

    cfg = load_config(RECIPE, overrides(records, tmp_path / "run", **{
        "train.steps": 2, "train.checkpoint_every": 1, "train.export_hf_at_end": "false"}))
    run_sft(cfg, progress=False)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--hf-dir", str(tmp_path / "hf"),
                                      "--step", "1"])
    assert result.exit_code == 0, result.output
    assert "exported step 1" in result.output
    model = R.load_hf_model(tmp_path / "hf")
    ours = _exported(tmp_path / "hf")
    name = "model.language_model.embed_tokens.weight"
    torch.testing.assert_close(dict(model.named_parameters())[name].detach(), torch.as_tensor(ours[name]))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
