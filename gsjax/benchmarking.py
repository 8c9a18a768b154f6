"""Shared pieces of the `scripts/bench_*.py` benchmarks: workloads, a random HF checkpoint both sides
load, a step timer and nominal accelerator peaks for MFU. Benchmarks print JSON; nothing here asserts."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gsjax.processing.tokens import IMAGE_PAD, TOKEN_IDS, VIDEO_PAD, VISION_END, VISION_START

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
    # Qwen's vocabulary (and vision ids) on a 2-layer toy decoder: CPU rehearsals of the GPU runs' paths
    "qwen-tiny": {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                      "mrope_interleaved": True}},
}
NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


CACHE_ENV = "GSJAX_BENCH_CACHE"
PROMPT_VOCAB = 4000  # benchmark prompts draw ids below this: text in every workload's vocabulary
QWEN_VISION_IDS = {"image_token_id": TOKEN_IDS[IMAGE_PAD], "video_token_id": TOKEN_IDS[VIDEO_PAD],
                   "vision_start_token_id": TOKEN_IDS[VISION_START], "vision_end_token_id": TOKEN_IDS[VISION_END]}


def build_checkpoint(workload: str, directory: Path, dtype: str = "float32") -> Path:
    """A random HF Qwen3-VL checkpoint with the workload's text decoder and a one-block vision tower.

    With $GSJAX_BENCH_CACHE set, the checkpoint lives in `$GSJAX_BENCH_CACHE/<workload>-<dtype>-<hash of its
    configs>` instead of `directory`, and later benchmarks reuse it: an 8B-shaped one takes a minute to build,
    which a device lease should spend once. The hash covers everything the build reads, so a changed workload
    never reuses a stale checkpoint; it is written to a temporary name and renamed, so a killed build is redone.
    """
    spec = checkpoint_spec(workload, dtype)
    cache = os.environ.get(CACHE_ENV)
    if not cache:
        return _build(spec, directory)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    final = Path(cache) / f"{workload}-{dtype}-{digest}"
    if not (final / "config.json").is_file():
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _build(spec, partial)
        partial.rename(final)
    return final


def checkpoint_spec(workload: str, dtype: str) -> dict:
    """What `build_checkpoint` builds: text and vision configs, special ids, dtype (JSON-able)."""
    text = {**WORKLOADS[workload], "max_position_embeddings": 262144}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 16,
              "out_hidden_size": text["hidden_size"], "num_position_embeddings": 64,
              "deepstack_visual_indexes": [0]}
    # Qwen's own vision ids in Qwen's vocabulary (the agent's prompts use them), else ids above PROMPT_VOCAB
    ids = QWEN_VISION_IDS if text["vocab_size"] > 151656 else {
        "image_token_id": PROMPT_VOCAB, "video_token_id": PROMPT_VOCAB + 1,
        "vision_start_token_id": PROMPT_VOCAB + 2, "vision_end_token_id": PROMPT_VOCAB + 3}
    return {"text": text, "vision": vision, "ids": ids, "dtype": dtype}


def _build(spec: dict, directory: Path) -> Path:
    from gsjax.models.qwen3_vl import reference as R

    return R.build_tiny_hf(directory, text=spec["text"], vision=spec["vision"], ids=spec["ids"],
                           dtype=spec["dtype"])


def text_only(config, ids: Sequence[int]) -> list[int]:
    """`ids` with any vision placeholder id (which a random model may sample) replaced by 0, so that feeding
    a model's output back as a prompt never asks for images that are not there."""
    from gsjax.train.grpo import vision_ids

    vision = vision_ids(config)
    return [0 if int(t) in vision else int(t) for t in ids]


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
    vocab = min(config.text.vocab_size, PROMPT_VOCAB)
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))


def emit(record: dict) -> None:
    """Print one benchmark record as a JSON line, with the versions of gsjax and of both compared stacks."""
    import gsjax
    from gsjax.versions import NUMERIC_PACKAGES, REFERENCE_PACKAGES, package_versions

    versions = {"gsjax": gsjax.__version__, **package_versions(NUMERIC_PACKAGES + REFERENCE_PACKAGES)}
    print(json.dumps({**record, "versions": versions}), flush=True)


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
