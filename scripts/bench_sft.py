#!/usr/bin/env python
"""SFT training-step throughput: the gsjax learner step vs a transformers/PyTorch training step.

Both sides load one random HF checkpoint, see the same batch and do the same work per step: masked
next-token cross-entropy (mean over target tokens), backward, global-norm clip 1.0, AdamW update.
gsjax runs its real `Learner` (jit, donated state, mesh over all local devices, fsdp=-1); PyTorch runs
`model(labels=...)`, `clip_grad_norm_`, `torch.optim.AdamW`. Prints one JSON line with tokens/s, MFU
(spec/qwen3vl.md §7 convention) and the speed ratio.

  CPU:  python scripts/bench_sft.py
  GPU:  python scripts/bench_sft.py --workload 8b-8layers --seq 4096 --batch 1 --dtype bfloat16 --remat dots
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from gsjax.benchmarking import (
    build_checkpoint,
    comparison,
    emit,
    random_token_ids,
    time_steps,
    training_bench_parser,
)

LR, WEIGHT_DECAY, CLIP = 1e-5, 1e-6, 1.0


def sft_batch(ids: np.ndarray) -> dict:
    """Every position predicts the next token (HF `labels=input_ids` semantics), text only."""
    batch, seq = ids.shape
    targets = np.concatenate([ids[:, 1:], np.zeros((batch, 1), ids.dtype)], axis=1).astype(np.int32)
    target_mask = np.ones((batch, seq), np.float32)
    target_mask[:, -1] = 0.0
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (3, batch, seq)).copy()
    return {"input_ids": ids.astype(np.int32), "attention_mask": np.ones((batch, seq), bool), "targets": targets,
            "target_mask": target_mask, "positions": positions, "vision": None}


def bench_gsjax(ckpt: Path, ids: np.ndarray, dtype: str, remat: str, attention: str, warmup: int,
                steps: int) -> dict:
    import jax

    from gsjax.models.qwen3_vl.attention import resolve_impl
    from gsjax.models.qwen3_vl.checkpoint import load_hf
    from gsjax.models.qwen3_vl.config import Qwen3VLConfig, RuntimeConfig
    from gsjax.parallel.mesh import MeshConfig, build_mesh
    from gsjax.train.learner import Learner
    from gsjax.train.state import (
        OptimizerSettings,
        make_optimizer,
        sharded_place,
        state_from_model,
        state_shardings,
    )

    runtime = RuntimeConfig(param_dtype="float32", dtype=dtype, attention_impl=attention, remat=remat)
    config = Qwen3VLConfig.from_file(ckpt, runtime=runtime)
    optimizer = make_optimizer(OptimizerSettings(lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=CLIP,
                                                 schedule="constant"))
    freeze: tuple[str, ...] = ()  # full fine-tune on both sides (the vision tower is idle for text batches)
    setup = state_shardings(config, freeze, optimizer, build_mesh(MeshConfig(fsdp=-1)))
    model = load_hf(ckpt, runtime=runtime, place=sharded_place(setup, freeze))
    state = state_from_model(model, freeze, optimizer, setup, seed=0)
    del model
    learner = Learner(setup, optimizer)
    device_batch = learner.shard_batch(sft_batch(ids))
    holder = {"state": state}

    def step():
        holder["state"], metrics = learner._step(holder["state"], device_batch)
        return float(metrics["loss"])  # blocks until the update is done

    t0 = time.perf_counter()
    loss = step()
    compile_s = time.perf_counter() - t0
    seconds = time_steps(step, warmup, steps)
    return {"seconds_per_step": seconds, "first_loss": loss, "compile_s": compile_s,
            "attention": resolve_impl(attention), "remat": remat, "devices": jax.device_count(),
            "device": str(jax.devices()[0].device_kind)}


def bench_torch(ckpt: Path, ids: np.ndarray, dtype: str, warmup: int, steps: int) -> dict:
    import torch

    from gsjax.models.qwen3_vl import reference as R

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    model = R.load_hf_model(ckpt, dtype="float32", attention="sdpa").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.999),
                                  eps=1e-8, fused=device == "cuda")
    batch = torch.as_tensor(ids, dtype=torch.long, device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    loss = step()
    seconds = time_steps(step, warmup, steps)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"seconds_per_step": seconds, "first_loss": loss, "device": name, "threads": torch.get_num_threads()}


def main() -> None:
    parser = training_bench_parser(
        __doc__, "compute dtype (params and AdamW state fp32 on both sides; torch uses autocast)")
    parser.add_argument("--remat", default="none", help="gsjax remat policy: none|full|dots|dots_no_batch")
    args = parser.parse_args()

    from gsjax.models.qwen3_vl.config import Qwen3VLConfig

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.workload, Path(tmp) / "ckpt")
        config = Qwen3VLConfig.from_file(ckpt)
        ids = random_token_ids(config, args.batch, args.seq)
        ours = bench_gsjax(ckpt, ids, args.dtype, args.remat, args.attention, args.warmup, args.steps)
        theirs = None if args.skip_torch else bench_torch(ckpt, ids, args.dtype, args.warmup, args.steps)
    emit(comparison("sft_step", args, config, ours, theirs, "first_loss", optimizer="adamw+clip"))


if __name__ == "__main__":
    main()
