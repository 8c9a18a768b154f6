"""Assemble a runnable agent (policy client + tool set + cache) from its configs.

One construction path for `gsjax agent run` and the evaluation runner, so both talk to the policy
and the tools in exactly the same way (same HTTP clients, same cache semantics, same redaction).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from gsjax.agent.config import PolicyConfig, ToolsConfig
from gsjax.agent.policy import OpenAIChatPolicy, Policy
from gsjax.agent.tools import ToolSet, open_toolset
from gsjax.agent.tools.cache import ToolCache


@dataclass(frozen=True)
class AgentParts:
    """What `run_episode` needs besides the task and the budgets."""

    policy: Policy
    tools: ToolSet


def tool_cache(cache_dir: Path | str | None, mode: str) -> ToolCache | None:
    """The record/replay cache, or None when caching is off (no folder or mode `off`)."""
    if cache_dir is None or mode == "off":
        return None
    return ToolCache(cache_dir, mode)


@asynccontextmanager
async def open_agent(policy_cfg: PolicyConfig, tools_cfg: ToolsConfig,
                     cache: ToolCache | None = None) -> AsyncIterator[AgentParts]:
    """Policy over an OpenAI-compatible endpoint plus the configured tools; clients close on exit.

    The parts may serve many concurrent episodes on the loop that opened them."""
    async with open_toolset(tools_cfg, cache) as toolset, httpx.AsyncClient() as client:
        yield AgentParts(OpenAIChatPolicy(policy_cfg, client), toolset)
