"""The `gsjax` command line. Each subcommand imports its heavy modules lazily so `--help` stays fast."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="gsjax",
    help="Train and run a search-augmented image-generation agent (Qwen3-VL policy) with JAX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main() -> None:
    """gsjax: SFT and agentic GRPO for a Qwen3-VL search agent, in JAX/Flax."""


if __name__ == "__main__":
    app()
