"""`gsjax grpo CONFIG [key=value ...]`: the typer command (mounted by gsjax.cli) and a `python -m` entry
for subprocess tests and launchers that do not go through the main CLI."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from gsjax.cli_errors import Command, typer_app


def grpo(
    config: Annotated[Path, typer.Argument(help="YAML recipe, e.g. configs/grpo_tiny_cpu.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.steps=100")] = None,
    progress: Annotated[bool, typer.Option(help="live progress line")] = True,
) -> None:
    """GRPO: rollouts on the engine, dual reward, group advantages, policy update, weight push; resumes from
    the latest checkpoint in train.out_dir."""
    from gsjax.train.grpo import run_grpo
    from gsjax.train.grpo_config import load_grpo_config

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("gsjax").setLevel(logging.INFO)
    result = run_grpo(load_grpo_config(config, overrides or []), progress=progress)
    last = result.history[-1] if result.history else {}
    typer.echo(f"finished at step {result.final_step}"
               + (f" (resumed from {result.resumed_from})" if result.resumed_from is not None else "")
               + (f"; last reward mean {last['reward/total_mean']:.4f}" if "reward/total_mean" in last else "")
               + (f"; HF export: {result.hf_dir}" if result.hf_dir else ""))


def main(argv: list[str] | None = None) -> None:
    from gsjax.malloc import keep_freed_memory

    keep_freed_memory()
    app = typer_app()
    app.command(cls=Command)(grpo)
    app(args=sys.argv[1:] if argv is None else argv, standalone_mode=True)


if __name__ == "__main__":
    main()
