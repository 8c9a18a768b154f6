#!/usr/bin/env python
"""The vision tower with dense vs banded block-diagonal attention (runtime.vision_max_frame_rows): seconds per
forward + backward, compiled FLOPs and temporary memory, and the largest output difference, in one run.

A batch of --frames images of --grid h×w patches each is packed into one row list (as the learner packs every
image of a micro-batch); the dense kernel masks an N×N score matrix, the banded one reads 3 × rows keys per
query block. Prints one JSON line.

  CPU:  python scripts/bench_vision_attention.py --preset tiny --frames 32 --grid 16x16
  GPU:  python scripts/bench_vision_attention.py --preset 8b --depth 4 --dtype bfloat16 --frames 16 --grid 32x32
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsjax.benchmarking import emit
from gsjax.models.qwen3_vl.config import preset
from gsjax.models.qwen3_vl.vision import VisionTower, vision_inputs


def tower(name: str, depth: int | None, dtype: str, max_frame_rows: int) -> VisionTower:
    cfg = preset(name)
    if depth:
        vision = dataclasses.replace(cfg.vision, depth=depth,
                                     deepstack_visual_indexes=tuple(i for i in cfg.vision.deepstack_visual_indexes
                                                                    if i < depth))
        cfg = dataclasses.replace(cfg, vision=vision)
    cfg = cfg.with_runtime(dtype=dtype, param_dtype=dtype, vision_max_frame_rows=max_frame_rows)
    return VisionTower(cfg, nnx.Rngs(0))


def measure(model: VisionTower, inputs, repeats: int) -> dict:
    graphdef, params = nnx.split(model)

    def loss(params, inputs):
        features, deepstack = nnx.merge(graphdef, params)(inputs)
        return sum(jnp.sum(f.astype(jnp.float32) ** 2) for f in (features, *deepstack)), features

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    compiled = step.lower(params, inputs).compile()
    (_, features), grads = step(params, inputs)
    jax.block_until_ready(grads)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, inputs))
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "gflops": compiled.cost_analysis()["flops"] / 1e9,
            "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20, "features": np.asarray(features)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--depth", type=int, default=None, help="vision blocks (default: the preset's)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--grid", default="16x16", help="patches per frame, h x w")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    h, w = (int(x) for x in args.grid.split("x"))
    rows = h * w
    grids = np.tile([1, h, w], (args.frames, 1))
    results = {}
    for label, bound in (("dense", 0), ("banded", rows)):
        model = tower(args.preset, args.depth, args.dtype, bound)
        pixels = np.random.default_rng(0).standard_normal((args.frames * rows, model.cfg.patch_dim)).astype(np.float32)
        inputs = jax.tree.map(jnp.asarray, vision_inputs(pixels, grids, model.cfg, max_frame_rows=bound))
        results[label] = measure(model, inputs, args.repeats)
    diff = float(np.abs(results["dense"].pop("features") - results["banded"].pop("features")).max())
    emit({
        "device": jax.devices()[0].device_kind, "preset": args.preset, "depth": args.depth, "dtype": args.dtype,
        "frames": args.frames, "rows_per_frame": rows, "patch_rows": args.frames * rows,
        **{f"{k}_{m}": round(v, 4) for k, r in results.items() for m, v in r.items()},
        "speedup": round(results["dense"]["seconds"] / results["banded"]["seconds"], 2),
        "max_abs_diff": diff})


if __name__ == "__main__":
    main()
