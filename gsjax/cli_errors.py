"""How every gsjax command line reports a user's mistake: one line and exit status 2, not a traceback.

Each Typer app of the package is built by `typer_app` (groups) or registers single commands with
`Command`: their `invoke` wraps the subcommand's body, so an `InputError` (a config key, a mesh that does
not fit, a record file that is not JSON, a missing dataset) is shown by its message, which names the
culprit. Any other exception keeps its traceback; `GSJAX_TRACEBACK=1` shows it for input errors too.
"""

from __future__ import annotations

import os
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from gsjax.errors import TRACEBACK_ENV, InputError

INPUT_ERROR_EXIT = 2  # click's status for a usage mistake


class _ShortInputErrors:
    """Mixin for a click command or group: an InputError raised inside becomes its message and exit 2."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except InputError as exc:
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                raise
            typer.echo(f"Error: {type(exc).__name__}: {exc}\n(set {TRACEBACK_ENV}=1 for the traceback)", err=True)
            raise typer.Exit(INPUT_ERROR_EXIT) from None


class CommandGroup(_ShortInputErrors, TyperGroup):
    """A Typer group whose subcommands report input errors in one line."""


class Command(_ShortInputErrors, TyperCommand):
    """A Typer command (the single-command apps behind `python -m ...`) that reports input errors in one line."""


def typer_app(**options: Any) -> typer.Typer:
    """A Typer app with the package's defaults: input errors in one line, no shell completion, no locals in
    tracebacks (they can hold API keys and whole arrays)."""
    defaults: dict[str, Any] = {"cls": CommandGroup, "add_completion": False, "pretty_exceptions_show_locals": False}
    return typer.Typer(**{**defaults, **options})
