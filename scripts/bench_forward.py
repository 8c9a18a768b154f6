#!/usr/bin/env python
"""Forward+backward tokens/s of gsjax (jit) vs transformers/PyTorch on the same Qwen3-VL text workload.

Both sides get identical weights (one random HF checkpoint, loaded by each), the same batch of token
ids and the same loss (next-token cross-entropy, mean over tokens); each timed step computes the loss
and all parameter gradients. Prints one JSON line. MFU uses spec/qwen3vl.md §7 (6N + causal attention)
against --peak-tflops (default: nominal bf16 dense peak of the detected GPU, none on CPU).

  CPU (perf-notes workload):  python scripts/bench_forward.py
  GPU (8B-shaped, 8 layers):  python scripts/bench_forward.py --workload 8b-8layers --seq 4096 --batch 1 \
                              --dtype bfloat16
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


def bench_gsjax(ckpt: Path, ids: np.ndarray, dtype: str, warmup: int, steps: int, attention: str) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from gsjax.models.qwen3_vl.checkpoint import load_hf
    from gsjax.models.qwen3_vl.config import RuntimeConfig
    from gsjax.models.qwen3_vl.model import prepare_inputs

    runtime = RuntimeConfig(param_dtype="float32", dtype=dtype, attention_impl=attention)
    model = load_hf(ckpt, runtime=runtime)
    inp = prepare_inputs(model.config, ids)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p, ids, positions):
        logits = nnx.merge(graphdef, p)(ids, positions).logits[:, :-1].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    ids_dev, pos_dev = jnp.asarray(inp["input_ids"]), jnp.asarray(inp["positions"])

    def step():
        loss, grads = grad_fn(params, ids_dev, pos_dev)
        jax.block_until_ready(grads)
        return loss

    t0 = time.perf_counter()
    loss = float(step())
    compile_s = time.perf_counter() - t0
    seconds = time_steps(step, warmup, steps)
    from gsjax.models.qwen3_vl.attention import resolve_impl

    return {"seconds_per_step": seconds, "loss": loss, "compile_s": compile_s,
            "attention": resolve_impl(attention), "device": str(jax.devices()[0].device_kind)}


def bench_torch(ckpt: Path, ids: np.ndarray, dtype: str, warmup: int, steps: int) -> dict:
    import torch

    from gsjax.models.qwen3_vl import reference as R

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    model = R.load_hf_model(ckpt, dtype="float32", attention="sdpa").to(device).train()
    batch = torch.as_tensor(ids, dtype=torch.long, device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    loss = float(step().detach())
    seconds = time_steps(step, warmup, steps)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"seconds_per_step": seconds, "loss": loss, "device": name, "threads": torch.get_num_threads()}


def main() -> None:
    parser = training_bench_parser(__doc__, "compute dtype (params fp32 on both sides; torch uses autocast for bf16)")
    args = parser.parse_args()

    from gsjax.models.qwen3_vl.config import Qwen3VLConfig

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.workload, Path(tmp) / "ckpt")
        config = Qwen3VLConfig.from_file(ckpt)
        ids = random_token_ids(config, args.batch, args.seq)
        ours = bench_gsjax(ckpt, ids, args.dtype, args.warmup, args.steps, args.attention)
        theirs = None if args.skip_torch else bench_torch(ckpt, ids, args.dtype, args.warmup, args.steps)
    emit(comparison("forward_backward", args, config, ours, theirs, "loss"))


if __name__ == "__main__":
    main()
