"""`train.compile_cache_dir`: a second process loads the executable the first one compiled (a cache hit, no
new entry), and the cached program computes the same result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gsjax.train.config import load_config

PROBE = """
import json, sys
import jax, jax.numpy as jnp
from gsjax.compile_cache import use_compile_cache

events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
use_compile_cache(sys.argv[1], min_compile_seconds=0.0)

@jax.jit
def program(x):
    for _ in range(20):
        x = jnp.tanh(x @ x.T) + x
    return x

value = float(program(jnp.eye(16) * 0.1).sum())
print(json.dumps({"value": value, "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def run_probe(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(cache)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("nested", [False, True])
def test_a_second_process_loads_the_compiled_program(tmp_path: Path, nested: bool) -> None:
    cache = tmp_path / "a" / "b" if nested else tmp_path  # the folder is created when missing
    first = run_probe(cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert first["hits"] == 0 and any(name.startswith("jit_program") for name in entries), entries
    second = run_probe(cache)
    assert second["hits"] >= 1
    assert second["value"] == first["value"]
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing compiled again


def test_the_setting_is_off_by_default_and_read_from_the_config() -> None:
    recipe = Path(__file__).resolve().parents[1] / "configs" / "sft_tiny_cpu.yaml"
    assert load_config(recipe).train.compile_cache_dir is None
    assert load_config(recipe, ["train.compile_cache_dir=runs/xla_cache"]).train.compile_cache_dir == "runs/xla_cache"
