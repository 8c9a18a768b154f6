"""`gsjax bench layouts`: run the real train step under several mesh layouts on the devices present and
compare step time, throughput and per-device memory (XLA's compiled number next to the estimate)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from rich.console import Console
from rich.table import Table

from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.models.qwen3_vl.flops import train_flops_per_token
from gsjax.train.learner import Learner
from gsjax.train.state import OptimizerSettings, TrainState, init_state

from .compiled import compile_step, compiled_peak_bytes, make_learner, random_batch
from .estimate import GIB, estimate_memory, parse_mesh


@dataclass(frozen=True)
class LayoutResult:
    layout: str
    mesh: dict[str, int]
    step_time_s: float  # median over the timed steps
    step_times_s: list[float]
    tokens_per_s: float
    model_flops_per_s: float  # train FLOPs per token (flops.py) × tokens/s, all devices together
    xla_peak_bytes: int | None  # per device, `estimate.xla_peak_bytes` of the compiled step
    estimate_bytes: int  # per device, `estimate_memory(...).total`
    estimate_error: float | None  # (estimate − xla) / xla
    loss: float


def _fresh_state(config: Qwen3VLConfig, learner: Learner, freeze: Sequence[str], seed: int,
                 template: TrainState | None) -> TrainState:
    """A state in this layout: initialised once (the init compile is slow), then copied into each later
    layout, so every layout starts from the same weights and each run may donate its own copy."""
    if template is None:
        return init_state(config, tuple(freeze), learner.optimizer, learner.setup, seed)
    copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=learner.setup.state_shardings)
    return copy(template)


def run_layout(config: Qwen3VLConfig, layout: str, batch: int, seq: int, steps: int, warmup: int,
               freeze: Sequence[str] = ("visual",), seed: int = 0,
               template: TrainState | None = None) -> tuple[LayoutResult, TrainState]:
    """Build mesh, state and learner for one layout; time `steps` steps after `warmup` on random tokens.

    Returns the result and a copy of the initial state for the next layout to start from.
    """
    devices = jax.devices()
    mesh_cfg = parse_mesh(layout)
    sizes = mesh_cfg.sizes(len(devices))
    optim = OptimizerSettings(total_steps=warmup + steps)
    learner = make_learner(config, mesh_cfg, freeze, optim, devices=devices)
    step = compile_step(config, learner, batch, seq, freeze)  # the executable that runs below
    peak = compiled_peak_bytes(step)
    estimate = estimate_memory(config, mesh_cfg, batch, seq, freeze=tuple(freeze), optim=optim,
                               backend=_backend(), num_devices=len(devices)).total
    state = _fresh_state(config, learner, freeze, seed, template)
    template = _fresh_state(config, learner, freeze, seed, state)  # kept undonated for the next layout
    device_batch = learner.shard_batch(random_batch(config, batch, seq, seed))
    times: list[float] = []
    metrics: dict[str, Any] = {}
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = step(state, device_batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens_per_s = batch * seq / median
    result = LayoutResult(
        layout=layout, mesh=sizes, step_time_s=median, step_times_s=times, tokens_per_s=tokens_per_s,
        model_flops_per_s=tokens_per_s * train_flops_per_token(config, seq), xla_peak_bytes=peak,
        estimate_bytes=estimate, estimate_error=None if not peak else (estimate - peak) / peak,
        loss=float(metrics["loss"]),
    )
    return result, template


def _backend() -> str:
    backend = jax.default_backend()
    return backend if backend in ("gpu", "tpu", "cpu") else "gpu"


def bench_layouts(config: Qwen3VLConfig, layouts: Sequence[str], batch: int, seq: int, steps: int = 3,
                  warmup: int = 1, freeze: Sequence[str] = ("visual",)) -> list[LayoutResult]:
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    results: list[LayoutResult] = []
    template: TrainState | None = None
    for layout in layouts:
        result, template = run_layout(config, layout, batch, seq, steps, warmup, freeze, template=template)
        results.append(result)
    return results


def results_json(results: Sequence[LayoutResult], meta: dict[str, Any]) -> str:
    return json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2)


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.3f}"


def results_table(results: Sequence[LayoutResult], title: str) -> Table:
    table = Table(title=title)
    for column in ("layout", "step s", "tokens/s", "XLA peak GiB/dev", "estimate GiB/dev", "est. error", "loss"):
        table.add_column(column, justify="left" if column == "layout" else "right")
    for r in results:
        error = "n/a" if r.estimate_error is None else f"{r.estimate_error * 100:+.1f}%"
        table.add_row(r.layout, f"{r.step_time_s:.3f}", f"{r.tokens_per_s:,.0f}", _gib(r.xla_peak_bytes),
                      _gib(r.estimate_bytes), error, f"{r.loss:.4f}")
    return table


def report(results: Sequence[LayoutResult], meta: dict[str, Any], console: Console,
           json_out: Path | None = None) -> str:
    """Print the table to `console` (stderr in the CLI, so stdout stays parseable JSON) and the JSON to
    stdout, and to `json_out` when given."""
    text = results_json(results, meta)
    console.print(results_table(results, f"layouts on {meta['devices']} × {meta['backend']}"))
    print(text)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    return text
