"""CLI: `gsjax bench layouts` (a typer sub-app) and `gsjax estimate` (a plain function the top-level app
registers as a command). Heavy imports stay inside the commands so `--help` is fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from gsjax.cli_errors import typer_app

bench_app = typer_app(help="Benchmarks of the train step: mesh layouts, memory.", no_args_is_help=True)

ModelOpt = Annotated[str, typer.Option("--model", help="preset (tiny, 2b, 4b, 8b, 30b-a3b) or an HF config.json "
                                                        "path / checkpoint directory")]
RematOpt = Annotated[str, typer.Option(help="remat policy of every text layer: none | full | dots | "
                                            "dots_no_batch | save_qkv_out")]
DtypeOpt = Annotated[str, typer.Option(help="compute dtype: float32 | bfloat16")]
ParamDtypeOpt = Annotated[str, typer.Option("--param-dtype", help="storage dtype of the weights")]
AttentionOpt = Annotated[str, typer.Option(help="attention kernel: auto | xla | chunked | cudnn")]
FreezeOpt = Annotated[str, typer.Option(help="freeze preset: vision | upstream | none")]


def load_model_config(model: str, remat: str, dtype: str, param_dtype: str, attention: str):
    """A preset name or an HF config.json (file or directory), with this runtime."""
    from gsjax.models.qwen3_vl.config import PRESETS, Qwen3VLConfig, RuntimeConfig, preset

    runtime = RuntimeConfig(param_dtype=param_dtype, dtype=dtype, remat=remat, attention_impl=attention)
    if model.lower() in PRESETS:
        config = preset(model)
        return config.with_runtime(**{f: getattr(runtime, f) for f in runtime.__dataclass_fields__}).validate()
    if not Path(model).exists():
        raise typer.BadParameter(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json or "
                                 "checkpoint directory", param_hint="--model")
    return Qwen3VLConfig.from_file(model, runtime=runtime)


def _freeze(name: str) -> tuple[str, ...]:
    from gsjax.train.config import FREEZE_PRESETS

    if name not in FREEZE_PRESETS:
        raise typer.BadParameter(f"freeze {name!r} not one of {sorted(FREEZE_PRESETS)}")
    return FREEZE_PRESETS[name]


def estimate(
    model: ModelOpt = "8b",
    mesh: Annotated[str, typer.Option(help="mesh, e.g. fsdp=8 or fsdp=4,tensor=2 (unnamed axes are 1)")] = "fsdp=8",
    seq: Annotated[int, typer.Option(help="tokens per sequence")] = 8192,
    batch: Annotated[int, typer.Option(help="global batch (sequences per step)")] = 8,
    remat: RematOpt = "full",
    dtype: DtypeOpt = "bfloat16",
    param_dtype: ParamDtypeOpt = "float32",
    attention: AttentionOpt = "auto",
    freeze: FreezeOpt = "vision",
    backend: Annotated[str, typer.Option(help="gpu | tpu | cpu: picks the auto attention kernel and how "
                                              "recomputation is scheduled")] = "gpu",
    recompute: Annotated[str | None, typer.Option(help="lazy | eager (default: eager on cpu, else lazy)")] = None,
    logits_chunk: Annotated[int, typer.Option(help="train.logits_chunk: LM head + loss this many positions at "
                                                   "a time (0: all at once)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Analytic per-device memory of one SFT step (params, grads, optimizer, activations) — no allocation."""
    from rich.console import Console

    from gsjax.bench.estimate import estimate_memory, parse_mesh
    from gsjax.bench.report import estimate_table

    if backend not in ("gpu", "tpu", "cpu"):
        raise typer.BadParameter(f"backend {backend!r} not one of gpu, tpu, cpu")
    if recompute not in (None, "lazy", "eager"):
        raise typer.BadParameter(f"recompute {recompute!r} not one of lazy, eager")
    try:
        config = load_model_config(model, remat, dtype, param_dtype, attention)
        result = estimate_memory(config, parse_mesh(mesh), batch, seq, freeze=_freeze(freeze), backend=backend,
                                 recompute=recompute, logits_chunk=logits_chunk)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    meta = {"model": model, "mesh": mesh, "seq": seq, "batch": batch, "remat": remat, "dtype": dtype,
            "param_dtype": param_dtype, "backend": backend}
    if as_json:
        print(json.dumps({**meta, **result.as_dict()}, indent=2))
    else:
        Console().print(estimate_table(result, meta))


@bench_app.command()
def layouts(
    layout: Annotated[list[str], typer.Option("--layout", help="mesh layout, repeatable; e.g. fsdp=8, "
                                                               "fsdp=4,tensor=2, data=2,fsdp=4")],
    model: ModelOpt = "tiny",
    seq: Annotated[int, typer.Option(help="tokens per sequence")] = 128,
    batch: Annotated[int, typer.Option(help="global batch")] = 8,
    steps: Annotated[int, typer.Option(help="timed steps per layout")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed steps first")] = 1,
    remat: RematOpt = "none",
    dtype: DtypeOpt = "float32",
    param_dtype: ParamDtypeOpt = "float32",
    attention: AttentionOpt = "auto",
    freeze: FreezeOpt = "vision",
    json_out: Annotated[Path | None, typer.Option("--json-out", help="also write the JSON here")] = None,
) -> None:
    """Run the train step under each layout on the devices present: step time, tokens/s, memory per device.

    The table goes to stderr and the JSON to stdout (and --json-out).
    """
    import jax
    from rich.console import Console

    from gsjax.bench.layouts import bench_layouts, report

    config = load_model_config(model, remat, dtype, param_dtype, attention)
    results = bench_layouts(config, layout, batch, seq, steps, warmup, _freeze(freeze))
    meta = {"model": model, "seq": seq, "batch": batch, "steps": steps, "warmup": warmup, "remat": remat,
            "dtype": dtype, "devices": jax.device_count(), "backend": jax.default_backend()}
    report(results, meta, Console(file=sys.stderr), json_out)
