"""The `gsjax` command line. Each subcommand imports its heavy modules lazily so `--help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gsjax.cli_errors import typer_app

app = typer_app(
    name="gsjax",
    help="Train and run a search-augmented image-generation agent (Qwen3-VL policy) with JAX.",
    no_args_is_help=True,
)


from gsjax.agent.cli import agent_app  # noqa: E402  (sub-apps register at import time)
from gsjax.bench.cli import bench_app, estimate  # noqa: E402
from gsjax.demo.cli import demo  # noqa: E402
from gsjax.eval.cli import eval_app  # noqa: E402
from gsjax.imagegen.cli import serve_image  # noqa: E402
from gsjax.rollout.cli import serve_policy  # noqa: E402
from gsjax.train.grpo_cli import grpo  # noqa: E402

app.add_typer(agent_app, name="agent", help="Run the search agent on a prompt (live trajectory, saved result).")
app.add_typer(eval_app, name="eval", help="KnowGen and WISE evaluation: run, generate, judge, score, compare.")
app.add_typer(bench_app, name="bench", help="Benchmarks: mesh layouts (step time, tokens/s, peak bytes).")
app.command(help="Analytic per-device memory (params, grads, optimizer, activations) for a model and mesh.")(estimate)
app.command("demo", help="Offline CPU demo: agent trajectories -> SFT -> image server -> agentic GRPO "
                         "(HEURISTIC rewards) -> report; resumes on rerun.")(demo)
app.command("grpo", help="Multi-turn agentic GRPO with the dual reward; resumes from train.out_dir.")(grpo)
app.command("serve-policy", help="Serve the policy: OpenAI chat + SGLang-style /generate, weight updates.")(
    serve_policy)
app.command("serve-image", help="Serve a diffusers image(-edit) pipeline over HTTP (POST /generate).")(serve_image)


def _print_version(value: bool) -> None:
    """`--version`: gsjax and the versions that decide its numerics, for bug reports and benchmark records."""
    if not value:
        return
    import gsjax
    from gsjax.versions import package_versions

    others = ", ".join(f"{name} {found}" for name, found in package_versions().items())
    typer.echo(f"gsjax {gsjax.__version__} ({others})")
    raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the versions of gsjax and its JAX stack, and exit.")] = False,
) -> None:
    """gsjax: SFT and agentic GRPO for a Qwen3-VL search agent, in JAX/Flax."""
    from gsjax.malloc import keep_freed_memory

    keep_freed_memory()  # before JAX starts its threads


@app.command()
def logits(
    hf_dir: Annotated[Path, typer.Option("--hf-dir", help="HF Qwen3-VL(-MoE) checkpoint directory")],
    inputs: Annotated[Path, typer.Option("--inputs", help="npz with input_ids, attention_mask "
                                                           "[, pixel_values, image_grid_thw]")],
    out: Annotated[Path, typer.Option("--out", help="where to write the logits (.npy, float32)")],
    dtype: Annotated[str, typer.Option(help="param and compute dtype: float32 | bfloat16")] = "float32",
) -> None:
    """Run gsjax's Qwen3-VL on arrays from an npz file and save the logits."""
    from gsjax.models.qwen3_vl.commands import write_logits

    write_logits(hf_dir, inputs, out, dtype)


@app.command()
def sft(
    config: Annotated[Path, typer.Argument(help="YAML recipe, e.g. configs/sft_tiny_cpu.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.steps=100")] = None,
    progress: Annotated[bool, typer.Option(help="live progress line")] = True,
) -> None:
    """Supervised fine-tuning on ShareGPT records; resumes from the latest checkpoint in train.out_dir."""
    import logging

    from gsjax.train.config import load_config
    from gsjax.train.sft import run_sft

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("gsjax").setLevel(logging.INFO)
    result = run_sft(load_config(config, overrides or []), progress=progress)
    typer.echo(f"finished at step {result.final_step}"
               + (f" (resumed from {result.resumed_from})" if result.resumed_from is not None else "")
               + f"; data: {result.data_stats}" + (f"; HF export: {result.hf_dir}" if result.hf_dir else ""))


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a run's out_dir or its checkpoints/ directory")],
    hf_dir: Annotated[Path, typer.Option("--hf-dir", help="where to write the HF checkpoint directory")],
    step: Annotated[int | None, typer.Option(help="checkpoint step (default: the latest)")] = None,
    dtype: Annotated[str | None, typer.Option(help="tensor dtype in the export (default: the params')")] = None,
) -> None:
    """Write a training checkpoint as an HF directory (config, safetensors, tokenizer)."""
    from gsjax.train.sft import export_checkpoint

    path, chosen = export_checkpoint(checkpoint, hf_dir, step=step, dtype=dtype)
    typer.echo(f"exported step {chosen} to {path}")


if __name__ == "__main__":
    app()
