#!/usr/bin/env python
"""Output tokens/s of the embedded JAX sampler vs transformers `generate` on the same model, and the cost of
one weight sync into the sampler.

Both sides load one random HF checkpoint, get the same prompts (random ids, equal lengths, so transformers
needs no padding) and the same sampling (greedy by default; --temperature/--top-p/--top-k for both), and
must produce exactly --new-tokens tokens per prompt (no stop tokens; transformers gets min_new_tokens).
A timed call is one whole batch, prefill plus decode (best of --repeats, the two sides interleaved); a call
for one token gives the prefill time and so the decode-only rate. The sampler is built with max_slots =
batch and without prefix reuse (the timed calls repeat the same prompts, which a reusing sampler would not
prefill again; scripts/bench_multiturn.py measures reuse). Weight sync: `export_hf` of the model plus
`update_weights(directory)`, and the in-memory `update_weights(state)`. Prints one JSON line; "ratio" is
gsjax tokens/s over transformers tokens/s.

  CPU (small):  python scripts/bench_sampler.py --prompt-lens 64,256 --new-tokens 32
  GPU:          python scripts/bench_sampler.py --workload 8b-8layers --dtype bfloat16 --prompt-lens 512,2048 \
                --new-tokens 256
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gsjax.benchmarking import WORKLOADS, build_checkpoint, emit, random_token_ids


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


def seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


class Ours:
    """The embedded sampler with max_slots = batch; `run(n)` generates n tokens for every prompt."""

    def __init__(self, model, prompts: np.ndarray, args: argparse.Namespace):
        from gsjax.rollout.jax_sampler import JaxSampler, SamplerConfig

        batch, length = prompts.shape
        if args.max_total_len < length + args.new_tokens:
            raise SystemExit(f"--max-total-len {args.max_total_len} is shorter than prompt {length} + new tokens")
        self.sampler = JaxSampler(model, SamplerConfig(max_slots=batch, max_total_len=args.max_total_len,
                                                       min_prefill_bucket=length, max_prefill_tokens=batch * length,
                                                       prefix_reuse=False))
        self.prompts, self.args = prompts, args

    def run(self, new_tokens: int) -> np.ndarray:
        from gsjax.rollout.engine import GenerationRequest, SamplingParams

        params = SamplingParams(max_tokens=new_tokens, seed=0, **sampling_kwargs(self.args))
        requests = [GenerationRequest(tuple(int(t) for t in row), params) for row in self.prompts]
        return np.asarray([r.output_ids for r in self.sampler.generate_batch(requests)])


class Theirs:
    """transformers `generate` (sdpa attention) on the same prompts and sampling."""

    def __init__(self, hf_model, prompts: np.ndarray, args: argparse.Namespace, device: str):
        import torch

        self.model, self.device, self.args = hf_model, device, args
        self.ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
        if args.temperature == 0:
            self.sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            self.sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                 top_k=max(args.top_k, 0))

    def run(self, new_tokens: int) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), pad_token_id=0,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, **self.sampling)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return out[:, self.ids.shape[1]:].cpu().numpy()


def measure(sides: dict, args: argparse.Namespace, batch: int) -> dict:
    """Best-of-`repeats` wall times of whole batches (n tokens, and 1 token = prefill), the sides interleaved
    so that both see the same machine load; decode rate from the difference."""
    n = args.new_tokens
    out: dict = {}
    first = {}
    for name, side in sides.items():
        first[name] = seconds(lambda s=side: s.run(n)) + seconds(lambda s=side: s.run(1))  # compile/warm up
    tokens = {}
    best = {name: [float("inf"), float("inf")] for name in sides}
    for _ in range(args.repeats):
        for name, side in sides.items():
            start = time.perf_counter()
            tokens[name] = side.run(n)
            best[name][0] = min(best[name][0], time.perf_counter() - start)
            best[name][1] = min(best[name][1], seconds(lambda s=side: s.run(1)))
    for name, (full, prefill) in best.items():
        assert tokens[name].shape == (batch, n), (name, tokens[name].shape)
        out[name] = {"seconds": full, "tokens_per_s": batch * n / full, "first_calls_s": first[name],
                     "prefill_s": prefill,
                     "decode_tokens_per_s": batch * (n - 1) / max(full - prefill, 1e-9)}
    if "torch" in out:
        out["ratio"] = out["gsjax"]["tokens_per_s"] / out["torch"]["tokens_per_s"]
        out["decode_ratio"] = out["gsjax"]["decode_tokens_per_s"] / out["torch"]["decode_tokens_per_s"]
        if args.temperature == 0:
            out["greedy_token_agreement"] = float(np.mean(tokens["gsjax"] == tokens["torch"]))
    return out


def bench_weight_sync(model, sampler_config, directory: Path) -> dict:
    """Seconds for export_hf + update_weights(dir), and for update_weights(in-memory state)."""
    import jax
    from flax import nnx

    from gsjax.models.qwen3_vl.checkpoint import export_hf
    from gsjax.rollout.jax_sampler import JaxSampler

    sampler = JaxSampler(model, sampler_config)
    state = nnx.state(model, nnx.Param)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    try:
        start = time.perf_counter()
        export_hf(model, directory)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        sampler.update_weights(directory, "from-disk")
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        sampler.update_weights(state, "in-memory")
        memory_s = time.perf_counter() - start
    finally:
        sampler.close()
    return {"params": n_params, "bytes": n_bytes, "export_s": export_s, "load_s": load_s,
            "export_plus_load_s": export_s + load_s, "in_memory_update_s": memory_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="cpu-small")
    parser.add_argument("--prompt-lens", default="64,256", help="comma-separated prompt lengths")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-total-len", type=int, default=4096,
                        help="the sampler's KV cache length per slot, prompt + output (SamplerConfig's default)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention", default="auto", help="prefill attention kernel: auto|xla|chunked|cudnn")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (best of), after a warm-up")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    import jax

    from gsjax.models.qwen3_vl import reference as R
    from gsjax.models.qwen3_vl.checkpoint import load_hf
    from gsjax.models.qwen3_vl.config import RuntimeConfig
    from gsjax.rollout.jax_sampler import SamplerConfig

    prompt_lens = [int(x) for x in args.prompt_lens.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.workload, Path(tmp) / "ckpt", args.dtype)
        model = load_hf(ckpt, runtime=RuntimeConfig(param_dtype=args.dtype, dtype=args.dtype,
                                                       attention_impl=args.attention))
        hf_model, device = None, "cpu"
        if not args.skip_torch:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            hf_model = R.load_hf_model(ckpt, dtype=args.dtype, attention="sdpa").to(device)
        for length in prompt_lens:
            for batch in batches:
                prompts = random_token_ids(model.config, batch, length, seed=length * 1000 + batch)
                sides = {"gsjax": Ours(model, prompts, args)}
                if hf_model is not None:
                    sides["torch"] = Theirs(hf_model, prompts, args, device)
                try:
                    run = measure(sides, args, batch)
                    run["gsjax"]["compilations"] = sides["gsjax"].sampler.compilations()
                finally:
                    sides["gsjax"].sampler.close()
                runs.append({"prompt_len": length, "batch": batch, "output_tokens": batch * args.new_tokens, **run})
        sync_config = SamplerConfig(max_slots=1, max_total_len=max(prompt_lens) + args.new_tokens)
        sync = bench_weight_sync(model, sync_config, Path(tmp) / "sync")
    ratios = [r["ratio"] for r in runs if "ratio" in r and r["batch"] == 16]
    result = {"bench": "sampler", "workload": args.workload, "dtype": args.dtype, "attention": args.attention,
              "new_tokens": args.new_tokens,
              "max_total_len": args.max_total_len,
              "sampling": sampling_kwargs(args), "device": str(jax.devices()[0].device_kind),
              "torch_device": device, "cpu_count": os.cpu_count(), "runs": runs,
              "min_ratio_at_batch_16": min(ratios) if ratios else None, "weight_sync": sync}
    emit(result)


if __name__ == "__main__":
    main()
