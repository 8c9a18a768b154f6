#!/usr/bin/env python
"""GRPO step timing on a recipe (default: configs/grpo_tiny_cpu.yaml, the agent path on the embedded JAX
sampler with the offline tools, heuristic judges and stand-in generator): seconds per phase (rollout,
reward, update, sync) and trained tokens/s. Prints one JSON line. The first `--warmup` steps (which
compile the sampler and learner programs) are reported apart and left out of the means.

  CPU:  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_grpo.py
  toy:  python scripts/bench_grpo.py --toy            (single-turn toy task on a vocab-256 model)
  GPU:  python scripts/bench_grpo.py --workload 8b-8layers     (the tiny recipe's agent episodes on a random
        8B-shaped decoder: bf16 compute, fp32 master weights, MFU against the device's nominal peak)
  GPU, real recipe:  python scripts/bench_grpo.py --config configs/grpo_qwen3vl_8b_gpu.yaml model.hf_dir=...
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "reward", "update", "sync", "step")


def toy_overrides(tmp: Path) -> list[str]:
    """The toy task on a freshly built tiny vocab-256 checkpoint (the learning test's setting)."""
    from gsjax.models.qwen3_vl import reference as R

    hf = R.build_tiny_hf(tmp / "toy_hf", seed=0, text={"num_hidden_layers": 2})
    return [f"model.hf_dir={hf}", "env.kind=toy", "data.path=null", "data.synthetic_prompts=16",
            "train.logits_chunk=0", "rollout.group_size=8", "rollout.prompts_per_step=4", "rollout.max_slots=32",
            "rollout.max_total_len=32", "rollout.min_prefill_bucket=16", "batch.buckets=[16]", "batch.pad_id=0",
            "optim.lr=1e-2"]


def workload_overrides(workload: str, tmp: Path, device_kind: str) -> list[str]:
    """A random checkpoint of a benchmark workload (Qwen's vocabulary, so the agent's prompts fit) run as
    the GPU recipe runs it: bf16 compute over fp32 master weights, MFU against the nominal peak."""
    from gsjax.benchmarking import WORKLOADS, build_checkpoint, peak_flops

    if WORKLOADS[workload]["vocab_size"] < 151936:
        raise SystemExit(f"--workload {workload}: the agent needs Qwen's 151936-entry vocabulary")
    hf = build_checkpoint(workload, tmp / "workload_hf", "bfloat16")
    peak = peak_flops(device_kind, None)
    return [f"model.hf_dir={hf}", "model.dtype=bfloat16", "model.param_dtype=float32",
            *([f"train.peak_flops_per_device={peak}"] if peak else [])]


def summarise(history: list[dict[str, float]], warmup: int) -> dict[str, object]:
    timed = history[warmup:] or history[-1:]
    mean = lambda key: float(np.mean([m.get(key, 0.0) for m in timed]))  # noqa: E731
    update_s = sum(m["time/update_s"] for m in timed)
    trained = sum(m.get("update/trained_tokens", 0.0) for m in timed)
    rollout_s = sum(m["time/rollout_s"] for m in timed)
    sampled = sum(m.get("rollout/sampled_tokens", 0.0) for m in timed)
    return {"seconds_per_phase": {p: mean(f"time/{p}_s") for p in PHASES},
            "warmup_seconds_per_phase": [{p: m[f"time/{p}_s"] for p in PHASES} for m in history[:warmup]],
            "trained_tokens_per_s": trained / update_s if update_s > 0 else 0.0,
            "trained_tokens_per_step": trained / len(timed),
            "rollout_sampled_tokens_per_s": sampled / rollout_s if rollout_s > 0 else 0.0,
            **{f"rollout_{k}": [m.get(f"rollout/{k}") for m in history]
               for k in ("compiled_programs", "prefill_calls", "decode_steps", "sampler_idle_s",
                         "sampler_device_wait_s")},
            "rollouts_per_step": mean("rollouts"), "episode_tokens_mean": mean("episode/tokens_mean"),
            "reward_mean": [m.get("reward/total_mean") for m in history], "timed_steps": len(timed),
            "mfu": mean("mfu") if any("mfu" in m for m in timed) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "grpo_tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps in all, warm-up included")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--toy", action="store_true", help="the single-turn toy task instead of the agent")
    parser.add_argument("--workload", default=None, help="a scripts benchmark workload instead of the config's model")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()

    from gsjax.malloc import keep_freed_memory

    malloc = keep_freed_memory()  # as `gsjax grpo` runs, before JAX starts its threads
    import jax

    from gsjax.benchmarking import emit
    from gsjax.train.grpo import run_grpo
    from gsjax.train.grpo_config import load_grpo_config

    with tempfile.TemporaryDirectory() as tmp:
        extra = toy_overrides(Path(tmp)) if args.toy else []
        if args.workload:
            extra += workload_overrides(args.workload, Path(tmp), str(jax.devices()[0].device_kind))
        cfg = load_grpo_config(args.config, [*extra, f"train.steps={args.steps}", "train.epochs=null",
                                             f"train.out_dir={Path(tmp) / 'run'}", "train.checkpoint_every=100000",
                                             "train.export_hf_at_end=false", "train.tensorboard=false",
                                             *args.overrides])
        result = run_grpo(cfg, progress=False)
    record = {"bench": "grpo_step", "config": Path(args.config).name, "workload": args.workload, "env": cfg.env.kind,
              "engine": cfg.rollout.engine, "group_size": cfg.rollout.group_size,
              "prompts_per_step": cfg.rollout.prompts_per_step, "devices": jax.device_count(),
              "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
              "malloc": malloc or "system",
              **summarise(result.history, args.warmup)}
    emit(record)


if __name__ == "__main__":
    main()
