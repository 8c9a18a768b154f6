"""The agent's tools and `ToolSet`, the one place tool calls are executed.

`ToolSet.call` adds what every call needs whatever the backend: a per-tool concurrency limit, a
total deadline, the record/replay cache, latency measurement and secret redaction. Tools report
expected failures in their output; anything unexpected is caught here and reported to the model,
so a tool can never end an episode. Only a strict-replay miss (the run cannot be reproduced from the
cache) is raised, as `CacheMiss`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from gsjax.agent.config import ToolsConfig
from gsjax.agent.protocol import UnknownToolError
from gsjax.agent.tools.base import (
    CacheMiss,
    Tool,
    ToolContext,
    ToolOutput,
    ToolTimeout,
    redact,
)
from gsjax.agent.tools.cache import CacheCorrupt, ToolCache, cache_key

log = logging.getLogger("gsjax.agent.tools")

__all__ = ["CacheCorrupt", "CacheMiss", "CallResult", "ToolSet", "open_toolset", "secrets_of"]


@dataclass(frozen=True)
class CallResult:
    output: ToolOutput
    latency_s: float
    cache_key: str | None
    cache_status: str  # off | hit | recorded | live


def secrets_of(cfg: ToolsConfig) -> list[str]:
    """Every key value a ToolsConfig holds, for redaction (each Jina key and the whole list)."""
    out = []
    for s in (cfg.serper_key, cfg.jina_keys, cfg.summary_api_key):
        out.append(s.reveal())
        out.extend(s.keys())
    return [x for x in out if x]


class ToolSet:
    """Named tools plus the cross-cutting call policy."""

    def __init__(self, tools: Sequence[Tool], cfg: ToolsConfig, cache: ToolCache | None = None,
                 secrets: Sequence[str] = ()):
        self.tools = {t.name: t for t in tools}
        self.cfg, self.cache = cfg, cache
        self.secrets = list(secrets)
        self._limits = {name: asyncio.Semaphore(cfg.per_tool_concurrency) for name in self.tools}

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    def get(self, name: str) -> Tool:
        if name not in self.tools:
            raise UnknownToolError(name, self.names)
        return self.tools[name]

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def _clean(self, out: ToolOutput) -> ToolOutput:
        return dataclasses.replace(
            out, text=self.redact(out.text), error=self.redact(out.error) if out.error else None,
            notes=tuple(self.redact(n) for n in out.notes),
            hits=tuple(dataclasses.replace(h, title=self.redact(h.title)) for h in out.hits))

    async def _live(self, tool: Tool, args: Mapping[str, Any], ctx: ToolContext) -> ToolOutput:
        deadline = self.cfg.browse_deadline_s if tool.name == "browse" else self.cfg.tool_deadline_s
        try:
            async with self._limits[tool.name]:
                async with asyncio.timeout(deadline):
                    return await tool.run(args, ctx)
        except TimeoutError:
            exc = ToolTimeout(f"{tool.name} did not finish within its {deadline:g} s deadline")
            return ToolOutput.failure(f"Error calling tool {tool.name}: {exc}", exc)
        except Exception as exc:  # a bug or an unforeseen failure must not end the episode
            msg = self.redact(f"{type(exc).__name__}: {exc}")
            log.error("tool %s failed unexpectedly: %s", tool.name, msg)
            return ToolOutput(text=f"Error calling tool {tool.name}: {msg}", error=msg, error_code="internal_error")

    async def call(self, tool: Tool, args: Mapping[str, Any], ctx: ToolContext) -> CallResult:
        """Run (or replay) one validated call. Raises only CacheMiss / CacheCorrupt."""
        key = None
        if self.cache is not None and self.cache.mode != "off":
            key = cache_key(tool.name, tool.backend, tool.cache_fields(), args)
        start = time.monotonic()
        if key is not None and self.cache is not None and self.cache.reads:
            hit = await asyncio.to_thread(self.cache.lookup, key, ctx.store)
            if hit is not None:
                return CallResult(hit.output, time.monotonic() - start, key, "hit")
            if self.cache.mode == "replay":
                raise self.cache.miss(key, tool.name, args)
        out = self._clean(await self._live(tool, args, ctx))
        latency = time.monotonic() - start
        status = "live"
        if key is not None and self.cache is not None and self.cache.writes:
            await asyncio.to_thread(self.cache.record, key, tool.name, tool.backend, tool.cache_fields(), args,
                                    out, latency, ctx.store)
            status = "recorded"
        return CallResult(out, latency, key, status)


@asynccontextmanager
async def open_toolset(cfg: ToolsConfig, cache: ToolCache | None = None) -> AsyncIterator[ToolSet]:
    """The configured backend's tools, with one shared HTTP client closed on exit."""
    if cfg.backend == "local":
        from gsjax.agent.tools.local import LocalBrowse, LocalCorpus, LocalImageSearch, LocalSearch

        corpus = await asyncio.to_thread(LocalCorpus.load, cfg.local_corpus_dir or None)
        yield ToolSet([LocalSearch(cfg, corpus), LocalImageSearch(cfg, corpus), LocalBrowse(cfg, corpus)],
                      cfg, cache, secrets_of(cfg))
        return
    if cfg.backend != "serper":
        raise ValueError(f"tools backend {cfg.backend!r} is not one of serper, local")
    from gsjax.agent.tools.browse import JinaBrowse
    from gsjax.agent.tools.image_search import SerperImageSearch
    from gsjax.agent.tools.search import SerperSearch

    limits = httpx.Limits(max_connections=4 * cfg.per_tool_concurrency, max_keepalive_connections=32)
    async with httpx.AsyncClient(limits=limits) as client:
        yield ToolSet([SerperSearch(cfg, client), SerperImageSearch(cfg, client), JinaBrowse(cfg, client)],
                      cfg, cache, secrets_of(cfg))
