#!/usr/bin/env python
"""Multi-turn rollouts through the embedded sampler with and without prefix reuse.

An agent's turn k+1 prompt is its turn-k prompt, the ids it sampled, and a tool response. Without reuse the
sampler prefills that whole history again every turn; with reuse it keeps each finished turn's keys/values
in its slot and prefills only the tool response. Here --episodes episodes run --turns turns in lockstep (one
batch per turn, as a GRPO step's agents roughly do): a first prompt of --first-prompt random ids, then per
turn --new-tokens sampled ids (greedy, no stop tokens) and --append random "tool response" ids. Timed: all
turns of all episodes (best of --repeats, after one warm-up that compiles every program). Prints one JSON
line with seconds, prompt tokens prefilled and reused, and the speedup.

  CPU:  python scripts/bench_multiturn.py --episodes 8 --turns 4 --first-prompt 256 --append 64 --new-tokens 32
  GPU:  python scripts/bench_multiturn.py --workload 8b-8layers --dtype bfloat16 --episodes 16 --turns 6 \
        --first-prompt 1024 --append 512 --new-tokens 256
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from gsjax.benchmarking import PROMPT_VOCAB, WORKLOADS, build_checkpoint, emit, text_only


def run_episodes(sampler, args: argparse.Namespace, seed: int) -> tuple[float, list[list[int]]]:
    """All episodes' turns, one batch per turn; returns the seconds and every episode's sampled ids. Each
    `seed` gives new first prompts, so a run's first turn never reuses an earlier run's prefixes."""
    from gsjax.rollout.engine import GenerationRequest, SamplingParams

    rng = np.random.default_rng(seed)
    vocab = min(sampler.model_config.text.vocab_size, PROMPT_VOCAB)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    histories = [list(rng.integers(0, vocab, args.first_prompt)) for _ in range(args.episodes)]
    sampled: list[list[int]] = [[] for _ in range(args.episodes)]
    start = time.perf_counter()
    for turn in range(args.turns):
        requests = [GenerationRequest(tuple(int(t) for t in h), params, request_id=f"e{i}t{turn}")
                    for i, h in enumerate(histories)]
        for i, result in enumerate(sampler.generate_batch(requests)):
            sampled[i] += result.output_ids
            tool_response = list(rng.integers(0, vocab, args.append))
            histories[i] += text_only(sampler.model_config, result.output_ids) + tool_response
    return time.perf_counter() - start, sampled


def measure(model, args: argparse.Namespace, reuse: bool) -> tuple[dict, list[list[int]]]:
    from gsjax.rollout.jax_sampler import JaxSampler, SamplerConfig, SamplerStats

    total = args.first_prompt + args.turns * (args.new_tokens + args.append)
    config = SamplerConfig(max_slots=args.episodes, max_total_len=total, min_prefill_bucket=args.min_bucket,
                           max_prefill_tokens=args.episodes * total, prefix_reuse=reuse)
    with JaxSampler(model, config) as sampler:
        warm_s, _ = run_episodes(sampler, args, seed=args.repeats)
        best, tokens, stats = float("inf"), [], SamplerStats()
        for repeat in range(args.repeats):
            sampler.stats = SamplerStats()
            seconds, sampled = run_episodes(sampler, args, seed=repeat)
            tokens += sampled
            if seconds < best:
                best, stats = seconds, sampler.stats
        out_tokens = args.episodes * args.turns * args.new_tokens
        return {"seconds": best, "first_run_s": warm_s, "output_tokens_per_s": out_tokens / best,
                "prefill_tokens": stats.prefill_tokens, "reused_tokens": stats.reused_tokens,
                "reused_rows": stats.reused_rows, "prefill_calls": stats.prefill_calls,
                "compilations": sampler.compilations()}, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="cpu-small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention", default="auto", help="prefill attention kernel: auto|xla|chunked|cudnn")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--first-prompt", type=int, default=256)
    parser.add_argument("--append", type=int, default=64, help="tool-response ids appended after every turn")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--min-bucket", type=int, default=64, help="the sampler's smallest prefill bucket")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax

    from gsjax.models.qwen3_vl.checkpoint import load_hf
    from gsjax.models.qwen3_vl.config import RuntimeConfig

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.workload, Path(tmp) / "ckpt", args.dtype)
        model = load_hf(ckpt, runtime=RuntimeConfig(param_dtype=args.dtype, dtype=args.dtype,
                                                       attention_impl=args.attention))
    reuse, reuse_tokens = measure(model, args, True)
    plain, plain_tokens = measure(model, args, False)
    agreement = float(np.mean(np.asarray(reuse_tokens) == np.asarray(plain_tokens)))
    emit({"bench": "multiturn", "workload": args.workload, "dtype": args.dtype, "attention": args.attention,
          "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
          "episodes": args.episodes, "turns": args.turns, "first_prompt": args.first_prompt,
          "append": args.append, "new_tokens": args.new_tokens, "reuse": reuse, "no_reuse": plain,
          "speedup": plain["seconds"] / reuse["seconds"], "greedy_token_agreement": agreement})


if __name__ == "__main__":
    main()
