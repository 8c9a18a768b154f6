"""`image_search`: Serper image search, then download, verify, re-encode and store (spec §5.3).

Differences from upstream, on purpose: arguments are whitelisted (no model-chosen save paths,
§8 item 13); a bounded number of refetches under the tool deadline instead of 50 slow ones (§8 item
16); every unusable candidate is counted with its reason and both errors and empty results reach the
model (§8 item 4); downloads pass the URL guard and a byte cap.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from gsjax.agent.config import ToolsConfig
from gsjax.agent.images import ImageDecodeError, reencode_download
from gsjax.agent.tools.base import (
    ImageHit,
    NotAnImage,
    ToolBadResponse,
    ToolContext,
    ToolError,
    ToolOutput,
    ToolTooLarge,
    classify_httpx,
    function_schema,
    guard_url,
    optional_int,
    raise_for_status,
    read_capped,
    require_str,
    split_known,
    with_retries,
)
from gsjax.agent.tools.search import serper_post

_IMAGE_KEYS = ("imageUrl", "image_url", "url", "thumbnailUrl", "thumbnail_url")
_PAGE_KEYS = ("link", "pageUrl", "sourceUrl", "source_url")
_TITLE_KEYS = ("title", "source")
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Candidate:
    title: str
    url: str
    page_url: str


def _first(item: Mapping[str, Any], keys: Sequence[str]) -> str:
    for k in keys:
        v = item.get(k)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return ""


def parse_candidates(items: Sequence[Any]) -> list[Candidate]:
    """Serper `images[]` -> candidates (field fallbacks as upstream); items without a URL dropped."""
    out, seen = [], set()
    for item in items:
        if not isinstance(item, dict):
            continue
        url = _first(item, _IMAGE_KEYS)
        if not url or url in seen:
            continue
        seen.add(url)
        out.append(Candidate(title=_first(item, _TITLE_KEYS) or "image", url=url, page_url=_first(item, _PAGE_KEYS)))
    return out


def no_results_text(query: str, failures: Counter[str]) -> str:
    why = ""
    if failures:
        why = " Unusable candidates: " + ", ".join(f"{n}x {reason}" for reason, n in failures.most_common()) + "."
    return (f"No usable images were found for [{query}].{why} Try again with a different, shorter query "
            "(at most 3 words) naming the main visual subject.")


def failure_note(failures: Counter[str], total: int) -> str:
    reasons = ", ".join(f"{n}x {reason}" for reason, n in failures.most_common())
    return f"{sum(failures.values())} of {total} candidate image(s) could not be used ({reasons})."


def referer_for(c: Candidate) -> str:
    if c.page_url:
        return c.page_url
    parts = urlsplit(c.url)
    return f"{parts.scheme}://{parts.netloc}/"


def parse_image_search_args(raw: Mapping[str, Any], default_k: int, max_k: int) -> tuple[dict[str, Any], list[str]]:
    known, ignored = split_known("image_search", raw, ("query", "top_k"))
    query = require_str("image_search", known, "query")
    return {"query": query, "top_k": optional_int("image_search", known, "top_k", default_k, 1, max_k)}, ignored


def image_search_schema(cfg: ToolsConfig) -> dict[str, Any]:
    return function_schema(
        "image_search",
        "Image search. Returns up to the requested number of images, each with an id (IMG_###), "
        "title, image URL, local path and source page; the images themselves are attached.",
        {"query": {"type": "string", "description": "A short query naming one visual subject."},
         "top_k": {"type": "integer",
                   "description": f"Images to return, 1-{cfg.image_max_results} (default {cfg.image_top_k})."}},
        ["query"])


async def store_image_bytes(data: bytes, ctx: ToolContext, cfg: ToolsConfig) -> str:
    """Verify + re-encode (CPU work, off the event loop) and store by content hash."""
    try:
        jpeg = await asyncio.to_thread(reencode_download, data, cfg.image_jpeg_quality, cfg.image_max_decoded_pixels)
    except ImageDecodeError as exc:
        raise NotAnImage(str(exc)) from None
    return await asyncio.to_thread(ctx.store.put, jpeg)


class SerperImageSearch:
    """Image search over Serper's `/images`, downloading into the episode's image store."""

    name = "image_search"
    backend = "serper"

    def __init__(self, cfg: ToolsConfig, client: httpx.AsyncClient, rng: random.Random | None = None):
        self.cfg, self.client, self.rng = cfg, client, rng or random.Random()

    def schema(self) -> dict[str, Any]:
        return image_search_schema(self.cfg)

    def parse_args(self, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return parse_image_search_args(raw, self.cfg.image_top_k, self.cfg.image_max_results)

    def cache_fields(self) -> dict[str, Any]:
        return {"jpeg_quality": self.cfg.image_jpeg_quality}

    async def _candidates(self, query: str, num: int) -> list[Candidate]:
        what = f"Serper image search for {query!r}"

        async def attempt() -> dict[str, Any]:
            return await serper_post(self.client, self.cfg.image_search_url, self.cfg.serper_key,
                                     {"q": query, "num": num}, self.cfg.retry.request_timeout_s, what, "images")

        data = await with_retries(what, attempt, self.cfg.retry, self.rng)
        return parse_candidates(data["images"])

    async def _fetch_bytes(self, c: Candidate) -> bytes:
        await guard_url(c.url, self.cfg.allow_private_urls)
        what = f"image download {c.url}"
        headers = {"User-Agent": self.cfg.image_user_agent,
                   "Accept": "image/avif,image/webp,image/apng,image/png,image/jpeg,image/*;q=0.8",
                   "Accept-Language": "en-US,en;q=0.9", "DNT": "1", "Referer": referer_for(c)}

        async def attempt() -> bytes:
            url = c.url
            try:
                for _ in range(MAX_REDIRECTS + 1):
                    async with self.client.stream("GET", url, headers=headers, follow_redirects=False,
                                                  timeout=self.cfg.download_retry.request_timeout_s) as resp:
                        if resp.is_redirect and "location" in resp.headers:
                            url = urljoin(url, resp.headers["location"])
                            await guard_url(url, self.cfg.allow_private_urls)  # every hop, not just the first
                            continue
                        raise_for_status(what, resp)
                        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                        if ctype and not ctype.startswith("image/"):
                            raise NotAnImage(f"{what}: content type {ctype!r} is not an image")
                        return await read_capped(resp, self.cfg.image_max_bytes, what)
            except httpx.HTTPError as exc:
                raise classify_httpx(what, exc) from None
            raise ToolBadResponse(f"{what}: more than {MAX_REDIRECTS} redirects")

        data = await with_retries(what, attempt, self.cfg.download_retry, self.rng)
        if len(data) < self.cfg.image_min_bytes:
            raise NotAnImage(f"{what}: only {len(data)} bytes (minimum {self.cfg.image_min_bytes})")
        return data

    async def _download(self, c: Candidate, ctx: ToolContext, limit: asyncio.Semaphore) -> ImageHit:
        async with limit:
            data = await self._fetch_bytes(c)
        try:
            digest = await store_image_bytes(data, ctx, self.cfg)
        except NotAnImage as exc:
            raise NotAnImage(f"image {c.url}: {exc}") from None
        return ImageHit(title=c.title, url=c.url, page_url=c.page_url, sha256=digest)

    async def _download_all(self, cands: Sequence[Candidate], ctx: ToolContext,
                            failures: Counter[str]) -> list[ImageHit]:
        limit = asyncio.Semaphore(self.cfg.image_download_concurrency)  # per call; calls are bounded by ToolSet
        results = await asyncio.gather(*(self._download(c, ctx, limit) for c in cands), return_exceptions=True)
        hits = []
        for res in results:
            if isinstance(res, ImageHit):
                hits.append(res)
            elif isinstance(res, ToolError):
                failures[_reason(res)] += 1
            else:
                raise res
        return hits

    async def run(self, args: Mapping[str, Any], ctx: ToolContext) -> ToolOutput:
        query, k = args["query"], args["top_k"]
        try:
            cands = await self._candidates(query, self.cfg.image_candidates)
        except ToolError as exc:
            return ToolOutput.failure(f"[ImageSearch] Error: {exc}", exc)
        failures: Counter[str] = Counter()
        hits = await self._download_all(cands, ctx, failures)
        tried = len(cands)
        if len(hits) < k and len(cands) >= self.cfg.image_candidates:
            try:
                more = await self._candidates(query, self.cfg.image_candidates_fallback)
            except ToolError as exc:
                failures[f"second page failed: {_reason(exc)}"] += 1
                more = []
            fresh = [c for c in more if c.url not in {x.url for x in cands}]
            tried += len(fresh)
            hits += await self._download_all(fresh, ctx, failures)
        unique: dict[str, ImageHit] = {}
        for h in hits:
            unique.setdefault(h.sha256, h)
        kept = list(unique.values())[: min(k, self.cfg.image_max_results)]
        notes = (failure_note(failures, tried),) if failures and kept else ()
        if not kept:
            return ToolOutput(text=no_results_text(query, failures), notes=notes)
        return ToolOutput(text="", hits=tuple(kept), notes=notes)


def _reason(exc: ToolError) -> str:
    """A short, groupable reason: the error code plus an HTTP status when there is one."""
    last = getattr(exc, "last", exc)
    status = getattr(last, "status", None)
    if isinstance(last, ToolTooLarge):
        return "too large"
    label = exc.code.replace("_", " ")
    return f"{label} {status}" if status else label
