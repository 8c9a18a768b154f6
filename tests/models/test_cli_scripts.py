"""`gsjax logits` and `scripts/check_logits.py` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import gsjax
from gsjax.versions import package_versions

ROOT = Path(__file__).resolve().parents[2]


def test_check_logits_script_reports_parity_and_fails_above_tolerance(hf_dirs):
    """One run: the JSON shows fp32 parity ≤ 1e-5 through `gsjax logits`, and a 1e-12 tolerance exits 1."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/check_logits.py"), "--hf-dir", str(hf_dirs["moe"]),
                           "--tol", "1e-12"], capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < result["max_abs_diff"] <= 1e-5
    assert result["top1_agreement"] == 1.0 and result["positions"] > 20
    assert proc.returncode == 1 and result["ok"] is False


def test_logits_command_rejects_incomplete_inputs(hf_dirs, tmp_path):
    npz = tmp_path / "in.npz"
    np.savez(npz, input_ids=np.array([[1, 2, 3]]), attention_mask=np.ones((1, 3)), pixel_values=np.zeros((4, 384)))
    proc = subprocess.run([sys.executable, "-m", "gsjax.cli", "logits", "--hf-dir", str(hf_dirs["dense"]),
                           "--inputs", str(npz), "--out", str(tmp_path / "out.npy")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "pixel_values and image_grid_thw must be given together" in proc.stderr
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("script", ["bench_forward.py", "bench_sft.py"])
def test_training_benchmarks_print_one_json_comparison(script):
    """Batch 8 (fsdp over 8 fake devices divides it): both sides, their ratio, equal first losses."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--batch", "8", "--seq", "32",
                           "--steps", "1", "--warmup", "0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["gsjax"]["tokens_per_s"] > 0 and result["torch"]["tokens_per_s"] > 0
    assert result["speed_ratio_gsjax_over_torch"] > 0
    assert min(v for k, v in result.items() if k.endswith("loss_abs_diff")) < 1e-4
    assert result["versions"] == {"gsjax": gsjax.__version__, **package_versions(("jax", "jaxlib", "flax", "optax",
                                                                                  "orbax-checkpoint", "torch",
                                                                                  "transformers"))}


def test_vision_attention_benchmark_compares_both_kernels_on_the_same_inputs():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench_vision_attention.py"), "--frames", "8",
                           "--grid", "4x4", "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["patch_rows"] == 128 and result["dense_seconds"] > 0 and result["banded_seconds"] > 0
    assert result["banded_gflops"] < result["dense_gflops"]
    assert result["max_abs_diff"] < 1e-5 and result["versions"]["jax"] == jax.__version__
