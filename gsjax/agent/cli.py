"""`gsjax agent run`: one episode from the command line, printed live, saved as JSON + images.

Mounted by the top-level CLI as `app.add_typer(agent_app, name="agent")`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from gsjax.agent.config import (
    CACHE_MODES,
    AgentConfig,
    PolicyConfig,
    ToolsConfig,
    agent_config_from_env,
    policy_config_from_env,
    tools_config_from_env,
)
from gsjax.cli_errors import typer_app

if TYPE_CHECKING:
    from gsjax.agent.loop import EpisodeResult, Task

agent_app = typer_app(help="Run the search agent against a policy server.", no_args_is_help=True)

_PREVIEW_CHARS = 1500


def _preview(text: str) -> str:
    if len(text) <= _PREVIEW_CHARS:
        return text
    return text[:_PREVIEW_CHARS] + f"\n... [{len(text) - _PREVIEW_CHARS} more chars]"


class LivePrinter:
    """Prints each event as it happens; the system prompt is shown only by its length."""

    def __init__(self, console: Console):
        self.console = console

    def __call__(self, event: object) -> None:
        from gsjax.agent.loop import Event

        assert isinstance(event, Event)
        if event.kind == "message" and event.message is not None:
            m = event.message
            if m.role == "system":
                self.console.print(f"[dim]system prompt: {len(m.text)} chars[/dim]")
                return
            style = {"assistant": "cyan", "user": "green"}.get(m.role, "white")
            title = m.role + (f" (+{len(m.images)} image(s))" if m.images else "")
            self.console.print(Panel(_escape(_preview(m.text)), title=title, border_style=style))
        elif event.kind == "tool_call" and event.tool_call is not None:
            c = event.tool_call
            status = f"[red]error: {_escape(c.error or '')}[/red]" if c.error else "[green]ok[/green]"
            self.console.print(f"[bold]tool[/bold] {c.name} {c.latency_s:.2f}s cache={c.cache_status} {status}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _summary(console: Console, result: object, path: Path) -> None:
    from gsjax.agent.loop import EpisodeResult

    assert isinstance(result, EpisodeResult)
    table = Table(show_header=False, box=None)
    table.add_row("termination", result.termination)
    table.add_row("rounds", str(result.rounds))
    table.add_row("tool calls", str(len(result.tool_calls)))
    table.add_row("time", f"{result.time_taken:.1f}s")
    if "gen_prompt" in result.prediction:
        table.add_row("gen_prompt", _escape(result.prediction["gen_prompt"]))
        for ref in result.prediction["reference_images"]:
            table.add_row(ref["img_id"], _escape(f"{ref['local_path']}  ({ref['note']})"))
    else:
        table.add_row("error", _escape(str(result.prediction.get("error"))))
    table.add_row("result", str(path))
    console.print(Panel(table, title="episode", border_style="magenta"))


@agent_app.command("run")
def run(
    prompt: Annotated[str, typer.Option("--prompt", help="The image-generation request, verbatim.")],
    tools: Annotated[str, typer.Option(help="serper (web, needs keys) or local (offline corpus).")] = "serper",
    cache: Annotated[Path | None, typer.Option(help="Record/replay cache folder.")] = None,
    cache_mode: Annotated[str | None, typer.Option(
        help="off | record | replay | replay-or-record (default with --cache: replay-or-record).")] = None,
    policy_url: Annotated[str | None, typer.Option(
        help="OpenAI-compatible base URL, e.g. http://host:8001/v1 (env GSJAX_POLICY_URL).")] = None,
    model: Annotated[str | None, typer.Option(help="Served policy model name (env GSJAX_POLICY_MODEL).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (one sub-folder per episode).")] = Path("runs/agent"),
    date: Annotated[str | None, typer.Option(help="Date shown to the policy, YYYY-MM-DD (default: today).")] = None,
    max_llm_calls: Annotated[int | None, typer.Option(min=1, help="Model-call budget (default 9).")] = None,
    corpus: Annotated[Path | None, typer.Option(help="Corpus folder for --tools local (default: built-in).")] = None,
    allow_private_urls: Annotated[bool, typer.Option(
        help="Let browse and image downloads reach loopback and private addresses.")] = False,
    task_id: Annotated[str | None, typer.Option(help="Episode id (default: random).")] = None,
    quiet: Annotated[bool, typer.Option(help="Print only the final summary.")] = False,
) -> None:
    """Run one episode and save `<out>/<task>_0/result.json` with its images."""
    from gsjax.agent.loop import Task

    if tools not in ("serper", "local"):
        raise typer.BadParameter(f"--tools must be serper or local, got {tools!r}")
    mode = cache_mode or ("replay-or-record" if cache else "off")
    if mode not in CACHE_MODES:
        raise typer.BadParameter(f"--cache-mode must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    if mode != "off" and cache is None:
        raise typer.BadParameter(f"--cache-mode {mode} needs --cache DIR")
    agent_over = {k: v for k, v in {"date": date, "max_llm_calls": max_llm_calls}.items() if v is not None}
    policy_over = {k: v for k, v in {"base_url": policy_url, "model": model}.items() if v is not None}
    agent_cfg = agent_config_from_env(None, **agent_over)
    policy_cfg = policy_config_from_env(None, **policy_over)
    tools_cfg = tools_config_from_env(None, backend=tools, allow_private_urls=allow_private_urls,
                                      local_corpus_dir=str(corpus) if corpus else "")
    console = Console()
    task = Task(prompt=prompt, task_id=task_id or "")
    result = asyncio.run(_run(task, agent_cfg, policy_cfg, tools_cfg, cache, mode, out,
                              None if quiet else LivePrinter(console)))
    _summary(console, result, Path(result.directory) / "result.json")
    if result.termination == "error":
        raise typer.Exit(code=1)


async def _run(task: Task, agent_cfg: AgentConfig, policy_cfg: PolicyConfig, tools_cfg: ToolsConfig,
               cache_dir: Path | None, mode: str, out: Path, printer: Callable[[Any], None] | None) -> EpisodeResult:
    from gsjax.agent.build import open_agent, tool_cache
    from gsjax.agent.loop import run_episode

    async with open_agent(policy_cfg, tools_cfg, tool_cache(cache_dir, mode)) as agent:
        return await run_episode(task, agent.policy, agent.tools, agent_cfg, out, on_event=printer)

