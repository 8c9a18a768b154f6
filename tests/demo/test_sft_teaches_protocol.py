"""The demo's SFT stage, at its default size, teaches the tiny model the tool protocol: after it, a greedy
first turn on (nearly) every held-out RL prompt takes the form of a tool call, and most parse in full
as `search` calls (the random init never does either)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gsjax.agent.protocol import parse_turn
from gsjax.demo.context import DemoConfig, Layout
from gsjax.models.qwen3_vl.checkpoint import load_hf
from gsjax.processing.template import render_chat
from gsjax.processing.tokenizer import load_tokenizer
from gsjax.rollout.engine import GenerationRequest, SamplingParams
from gsjax.rollout.jax_sampler import JaxSampler, SamplerConfig


def first_turns(hf_dir: Path, system: str, prompts: list[str]) -> list[str]:
    """Greedy first assistant turn for each prompt, decoded, through the embedded sampler."""
    tokenizer = load_tokenizer()
    ids = [tokenizer.encode(render_chat([{"role": "system", "content": system}, {"role": "user", "content": p}],
                                        add_generation_prompt=True)) for p in prompts]
    sampler = JaxSampler(load_hf(hf_dir), SamplerConfig(max_slots=len(ids), max_total_len=2048,
                                                        min_prefill_bucket=2048, max_prefill_tokens=2048 * len(ids)))
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    params = SamplingParams(max_tokens=96, temperature=0.0, stop_token_ids=(stop,))
    outs = sampler.generate_batch([GenerationRequest(tuple(i), params) for i in ids])
    return [tokenizer.decode([t for t in o.output_ids if t != stop]) for o in outs]


@pytest.mark.full_demo  # outside the 30-minute CI: `GSJAX_FULL_DEMO_TESTS=1 pytest tests/demo` (README)
@pytest.mark.slow
@pytest.mark.timeout(2400)  # CI runs two test workers on two cores: this run then takes up to twice as long
def test_default_demo_sft_makes_the_first_turn_a_valid_search_call(tmp_path: Path) -> None:
    """`gsjax demo --grpo-steps 0` as it runs for a user (one CPU device), then greedy first turns."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = [sys.executable, "-m", "gsjax.demo.cli", "--workdir", str(tmp_path), "--grpo-steps", "0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=2100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    layout = Layout(tmp_path)
    state = json.loads(layout.state.read_text())["stages"]
    assert state["sft"]["steps"] == DemoConfig().sft_steps

    system = json.loads((layout.data / "sft.jsonl").read_text().splitlines()[0])["messages"][0]["content"]
    prompts = [row["prompt"] for row in json.loads((layout.data / "rl_tasks.json").read_text())]
    turns = [parse_turn(text) for text in first_turns(layout.sft_hf, system, prompts)]
    losses = [json.loads(line)["loss"] for line in (layout.sft / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] > 10 and np.mean(losses[-20:]) < 0.5  # from ln(vocab) to a fraction of a nat per token
    # A run is reproducible on one machine, but other CPUs may round differently and hundreds of steps amplify
    # that, so the thresholds leave room. Without the learning-rate warmup, runs of the same seed gave 10, 8, 5
    # and 2 valid calls (repeated tags and JSON keys); warmed up, seeds 0 to 3 gave 9 or 10, the misses being
    # garbled subject names. The random init gets none. The name is not asserted: copying it is beyond this budget.
    in_form = [t for t in turns if t.kind == "tool_call"]
    valid = [t for t in turns if t.error is None and t.tool_call is not None]
    assert len(in_form) >= 8 and len(valid) >= 5, turns
    assert {t.tool_call.name for t in valid} == {"search"}
    assert all(isinstance(t.tool_call.arguments.get("queries"), list) and t.tool_call.arguments["queries"]
               for t in valid)
