"""Shared pieces of the `scripts/bench_*.py` benchmarks: workloads, a random HF checkpoint both sides
load, a step timer and nominal accelerator peaks for MFU. Benchmarks print JSON; nothing here asserts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

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


def build_checkpoint(workload: str, directory: Path, dtype: str = "float32") -> Path:
    """A random HF Qwen3-VL checkpoint with the workload's text decoder and a one-block vision tower."""
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
