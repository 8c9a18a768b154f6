"""Shared pieces of the `scripts/bench_*.py` benchmarks: workloads, a random HF checkpoint both sides
load, a step timer and nominal accelerator peaks for MFU. Benchmarks print JSON; nothing here asserts."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

WORKLOADS: dict[str, dict] = {
    # perf-notes.md: hidden 256, 4 layers, 8/4 heads, hd 32, SwiGLU 768, vocab 4096
    "cpu-small": {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4],
                                      "mrope_interleaved": True}},
    # spec §7 anchor: Qwen3-8B-shaped decoder cut to 8 layers, untied
    "8b-8layers": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 8,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                       "mrope_interleaved": True}},
}
NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


CACHE_ENV = "GSJAX_BENCH_CACHE"


def build_checkpoint(workload: str, directory: Path, dtype: str = "float32") -> Path:
    """A random HF Qwen3-VL checkpoint with the workload's text decoder and a one-block vision tower.

    With $GSJAX_BENCH_CACHE set, the checkpoint lives in `$GSJAX_BENCH_CACHE/<workload>-<dtype>` instead of
    `directory` and later benchmarks reuse it: an 8B-shaped one takes a minute to build, which a device
    lease should spend once. It is written to a temporary name and renamed, so a killed build is redone."""
    cache = os.environ.get(CACHE_ENV)
    if cache:
        final = Path(cache) / f"{workload}-{dtype}"
        if not (final / "config.json").is_file():
            partial = final.with_name(final.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            _build(workload, partial, dtype)
            partial.rename(final)
        return final
    return _build(workload, directory, dtype)


def _build(workload: str, directory: Path, dtype: str) -> Path:
    from gsjax.models.qwen3_vl import reference as R

    text = {**WORKLOADS[workload], "max_position_embeddings": 262144}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 16,
              "out_hidden_size": text["hidden_size"], "num_position_embeddings": 64,
              "deepstack_visual_indexes": [0]}
    ids = {} if text["vocab_size"] > 151656 else {"image_token_id": 4000, "video_token_id": 4001,
                                                  "vision_start_token_id": 4002, "vision_end_token_id": 4003}
    return R.build_tiny_hf(directory, text=text, vision=vision, ids=ids, dtype=dtype)


def time_steps(step: Callable[[], object], warmup: int, steps: int) -> float:
    """Mean seconds per call after `warmup` untimed calls (`step` must block until its work is done)."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    """Nominal dense bf16 peak of a known accelerator (None on CPU unless overridden)."""
    if override_tflops:
        return override_tflops * 1e12
    return next((v for k, v in NOMINAL_BF16_PEAK.items() if k in device_name), None)


def training_bench_parser(description: str, dtype_help: str) -> argparse.ArgumentParser:
    """The options every gsjax-vs-PyTorch training benchmark shares (workload, shape, dtype, timing)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="cpu-small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help=dtype_help)
    parser.add_argument("--attention", default="auto", help="gsjax attention kernel: auto|xla|chunked|cudnn")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--skip-torch", action="store_true")
    return parser


def random_token_ids(config, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """Text token ids below the special/vision ids of the workloads' vocabularies."""
    vocab = min(config.text.vocab_size, 4000)
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))


def comparison(bench: str, args: argparse.Namespace, config, ours: dict, theirs: dict | None,
               loss_key: str, **extra: object) -> dict:
    """One JSON record: both sides' tokens/s and MFU (spec §7 convention), their ratio and loss agreement."""
    from gsjax.models.qwen3_vl.flops import mfu, train_flops_per_token

    tokens = args.batch * args.seq
    flops = train_flops_per_token(config, args.seq)
    peak = peak_flops(ours["device"], args.peak_tflops)

    def throughput(side: dict) -> dict:
        rate = tokens / side["seconds_per_step"]
        return {**side, "tokens_per_s": rate, "mfu": None if peak is None else mfu(rate, flops, peak)}

    result = {"bench": bench, "workload": args.workload, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
              **extra, "flops_per_token": flops, "mfu_convention": "6N + causal attention, nominal peak",
              "cpu_count": os.cpu_count(), "gsjax": throughput(ours)}
    if theirs is not None:
        result["torch"] = throughput(theirs)
        result["speed_ratio_gsjax_over_torch"] = theirs["seconds_per_step"] / ours["seconds_per_step"]
        result[f"{loss_key}_abs_diff"] = abs(ours[loss_key] - theirs[loss_key])
    return result
