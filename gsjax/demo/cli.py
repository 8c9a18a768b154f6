"""`gsjax demo`: the README's main job. The lead mounts `demo` as the top-level command."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from gsjax.cli_errors import Command, typer_app
from gsjax.demo.context import DemoConfig

DEFAULTS = DemoConfig()


def _progress_only(record: logging.LogRecord) -> bool:
    """Warnings, and gsjax's progress lines except one per agent episode (bm25s forces itself to DEBUG)."""
    if record.levelno >= logging.WARNING:
        return True
    return record.name.startswith("gsjax") and not record.name.startswith("gsjax.agent")


def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes everything; a second run resumes.")] = (
        DEFAULTS.workdir),
    sft_steps: Annotated[int, typer.Option(
        min=1, help="SFT optimizer steps on the built-in trajectories.")] = DEFAULTS.sft_steps,
    grpo_steps: Annotated[int, typer.Option(min=0, help="GRPO steps (0: skip the RL stage).")] = DEFAULTS.grpo_steps,
    prompts_per_step: Annotated[int, typer.Option(min=1, help="GRPO prompts per step.")] = DEFAULTS.prompts_per_step,
    group_size: Annotated[int, typer.Option(min=1, help="GRPO rollouts per prompt.")] = DEFAULTS.group_size,
    max_llm_calls: Annotated[int, typer.Option(min=1, help="Policy calls per GRPO episode.")] = DEFAULTS.max_llm_calls,
    max_new_tokens: Annotated[int, typer.Option(
        min=1, help="New tokens per policy turn in GRPO.")] = DEFAULTS.max_new_tokens_per_turn,
    fresh: Annotated[bool, typer.Option(
        help="Start over: delete what the work folder holds (compiled programs excepted) instead of resuming.",
    )] = False,
) -> None:
    """Offline, on CPU: synthetic agent trajectories -> SFT of a tiny Qwen3-VL -> image server (tiny diffusers
    pipeline) -> agentic GRPO with HEURISTIC rewards -> report. Ctrl-C stops cleanly; rerun to resume."""
    from rich.console import Console

    from gsjax.demo.pipeline import run_demo

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("gsjax").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_progress_only)
    console = Console()
    cfg = DemoConfig(workdir=workdir, sft_steps=sft_steps, grpo_steps=grpo_steps, prompts_per_step=prompts_per_step,
                     group_size=group_size, max_llm_calls=max_llm_calls, max_new_tokens_per_turn=max_new_tokens,
                     fresh=fresh)
    try:
        result = run_demo(cfg, console=console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: the image server was stopped and checkpoints are consistent; "
                      f"run the same command again to resume from {workdir}.")
        # Everything that matters is closed. An interrupted JAX run can crash in interpreter teardown
        # (background XLA / checkpoint threads), which would turn exit code 130 into a segfault.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    typer.echo(f"report: {result.report}")


def main() -> None:
    """`python -m gsjax.demo.cli ...` (tests, and runs without the top-level CLI)."""
    from gsjax.malloc import keep_freed_memory

    keep_freed_memory()
    app = typer_app()
    app.command(cls=Command)(demo)
    app()


if __name__ == "__main__":
    main()
