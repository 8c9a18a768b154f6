"""`search`: Serper web search (spec §5.2), bounded retries, one result block per query.

A failed query yields `Search failed for '<q>': <reason>` inside its block, so the model always
sees why; the other queries of the same call still return their hits.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from gsjax.agent.config import Secret, ToolsConfig
from gsjax.agent.protocol import ToolArgumentError
from gsjax.agent.tools.base import (
    ToolBadResponse,
    ToolConfigError,
    ToolContext,
    ToolError,
    ToolOutput,
    classify_httpx,
    function_schema,
    json_object,
    optional_int,
    raise_for_status,
    split_known,
    str_list,
    with_retries,
)

_BOLD = re.compile(r"</?b>")


async def serper_post(client: httpx.AsyncClient, url: str, key: Secret, body: dict[str, Any],
                      timeout_s: float, what: str, list_field: str) -> dict[str, Any]:
    """One Serper request; a 200 carrying `message`/`error` and no `list_field` is a failure."""
    if not key:
        raise ToolConfigError("SERPER_KEY_ID is not set")
    try:
        resp = await client.post(url, json=body, timeout=timeout_s,
                                 headers={"X-API-KEY": key.reveal(), "Content-Type": "application/json"})
    except httpx.HTTPError as exc:
        raise classify_httpx(what, exc) from None
    raise_for_status(what, resp)
    data = json_object(what, resp)
    if list_field not in data:
        msg = data.get("message") or data.get("error") or f"no '{list_field}' field"
        raise ToolBadResponse(f"{what}: {str(msg)[:200]}")
    if not isinstance(data[list_field], list):
        raise ToolBadResponse(f"{what}: '{list_field}' is {type(data[list_field]).__name__}, not a list")
    return data


def render_search_block(query: str, hits: Sequence[Mapping[str, str]] | None, failure: str | None = None) -> str:
    """One query's block (spec §5.2): `[title](link) snippet` per hit, or the failure, or no-results."""
    if failure is not None:
        inner = failure
    elif not hits:
        inner = f"No results for '{query}'."
    else:
        inner = "\n\n".join(f"[{h['title']}]({h['link']}) {h['snippet']}".rstrip() for h in hits)
    return f"--- search result for [{query}] ---\n{inner}\n--- end of search result ---"


def organic_hits(data: Mapping[str, Any], top_k: int) -> list[dict[str, str]]:
    hits = []
    for item in data.get("organic", [])[:top_k]:
        if not isinstance(item, dict):
            continue
        hits.append({k: _BOLD.sub("", str(item.get(k) or "")) for k in ("title", "link", "snippet")})
    return hits


def parse_search_args(raw: Mapping[str, Any], default_k: int, max_k: int,
                      max_queries: int) -> tuple[dict[str, Any], list[str]]:
    """`queries` (list or string; upstream also took `query`) and a clamped `top_k`."""
    known, ignored = split_known("search", raw, ("queries", "query", "top_k"))
    value = known.get("queries", known.get("query"))
    if value is None:
        raise ToolArgumentError("search", '"queries" is required (a list of search strings)')
    queries = str_list("search", value, "queries", max_queries)
    return {"queries": queries, "top_k": optional_int("search", known, "top_k", default_k, 1, max_k)}, ignored


class SerperSearch:
    """Web search over Serper's `/search` endpoint."""

    name = "search"
    backend = "serper"

    def __init__(self, cfg: ToolsConfig, client: httpx.AsyncClient, rng: random.Random | None = None):
        self.cfg, self.client, self.rng = cfg, client, rng or random.Random()

    def schema(self) -> dict[str, Any]:
        return search_schema(self.cfg)

    def parse_args(self, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return parse_search_args(raw, self.cfg.search_top_k, self.cfg.search_max_top_k, self.cfg.search_max_queries)

    def cache_fields(self) -> dict[str, Any]:
        return {}

    async def _one(self, query: str, top_k: int) -> str:
        q = query.replace('"', "").replace("'", "")
        what = f"Serper search for {q!r}"

        async def attempt() -> dict[str, Any]:
            return await serper_post(self.client, self.cfg.text_search_url, self.cfg.serper_key,
                                     {"q": q, "num": top_k}, self.cfg.retry.request_timeout_s, what, "organic")

        data = await with_retries(what, attempt, self.cfg.retry, self.rng)
        return render_search_block(query, organic_hits(data, top_k))

    async def run(self, args: Mapping[str, Any], ctx: ToolContext) -> ToolOutput:
        queries, top_k = args["queries"], args["top_k"]
        results = await asyncio.gather(*(self._one(q, top_k) for q in queries), return_exceptions=True)
        blocks, errors = [], []
        for q, res in zip(queries, results, strict=True):
            if isinstance(res, ToolError):
                errors.append(f"Search failed for '{q}': {res}")
                blocks.append(render_search_block(q, None, errors[-1]))
            elif isinstance(res, BaseException):
                raise res
            else:
                blocks.append(res)
        error_code = None
        if errors:
            error_code = next(getattr(r, "code", "tool_error") for r in results if isinstance(r, ToolError))
        return ToolOutput(text="\n\n".join(blocks), error="; ".join(errors) or None, error_code=error_code)


def search_schema(cfg: ToolsConfig) -> dict[str, Any]:
    return function_schema(
        "search",
        "Web search. Returns a short title, URL and snippet for each hit of each query.",
        {"queries": {"type": "array", "items": {"type": "string"},
                     "description": f"One or more distinct search queries (at most {cfg.search_max_queries})."},
         "top_k": {"type": "integer",
                   "description": f"Hits per query, 1-{cfg.search_max_top_k} (default {cfg.search_top_k})."}},
        ["queries"])
