"""The GPU benchmarks' scripts rehearsed on CPU with the Qwen-vocabulary toy workload (`qwen-tiny`): the
same code paths as the 8B-shaped runs (Qwen's vision ids, the agent's prompts, the shared checkpoint
cache), so a device lease is never spent on a bug that a CPU run shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, *args: str, cache: Path) -> dict:
    env = {**os.environ, "GSJAX_BENCH_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sampler_and_multiturn_benchmarks_run_on_a_qwen_vocabulary_workload(tmp_path):
    sampler = run_script("bench_sampler.py", "--workload", "qwen-tiny", "--prompt-lens", "24", "--batches", "2",
                         "--new-tokens", "4", "--repeats", "1", cache=tmp_path)
    (run,) = sampler["runs"]
    assert run["gsjax"]["tokens_per_s"] > 0 and run["torch"]["tokens_per_s"] > 0 and run["ratio"] > 0
    assert run["greedy_token_agreement"] == 1.0  # fp32: both sides pick the same tokens
    assert sampler["weight_sync"]["export_plus_load_s"] > 0
    multiturn = run_script("bench_multiturn.py", "--workload", "qwen-tiny", "--episodes", "2", "--turns", "3",
                           "--first-prompt", "64", "--append", "16", "--new-tokens", "8", "--min-bucket", "16",
                           "--repeats", "1", cache=tmp_path)
    assert multiturn["reuse"]["reused_tokens"] > 0 and multiturn["greedy_token_agreement"] == 1.0
    assert len(list(tmp_path.iterdir())) == 1  # one checkpoint, built once, shared by both


def test_grpo_benchmark_runs_the_agent_on_a_benchmark_workload(tmp_path):
    result = run_script("bench_grpo.py", "--workload", "qwen-tiny", "--steps", "1", "--warmup", "0",
                        "rollout.group_size=2", "rollout.prompts_per_step=1", "env.max_llm_calls=1",
                        "env.max_new_tokens_per_turn=4", cache=tmp_path)
    assert result["workload"] == "qwen-tiny" and result["env"] == "agent" and result["rollouts_per_step"] == 2
    assert result["trained_tokens_per_step"] > 0 and result["seconds_per_phase"]["update"] > 0
    assert result["rollout_compiled_programs"][0] >= 1
