"""Offline tools over a local corpus, so the whole agent runs with no internet (demo, CI, ablations).

`search` is BM25 (bm25s) over document titles and texts; `image_search` is BM25 over image captions
in a local folder; `browse` returns a corpus document by its URL. Schemas, argument rules and output
formats are the same as the web tools', so the policy cannot tell the backends apart by protocol.

Corpus folder layout: `docs.jsonl` ({id, title, url, text}), `images.jsonl` ({file, title, caption,
page_url}) and the image files next to it under `images/`.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsjax.agent.config import ToolsConfig
from gsjax.agent.tools.base import ImageHit, ToolContext, ToolError, ToolOutput
from gsjax.agent.tools.browse import URL_SEPARATOR, browse_schema, parse_browse_args
from gsjax.agent.tools.image_search import (
    image_search_schema,
    no_results_text,
    parse_image_search_args,
    store_image_bytes,
)
from gsjax.agent.tools.search import organic_hits, parse_search_args, render_search_block, search_schema

BUILTIN_CORPUS = Path(__file__).resolve().parents[2] / "assets" / "corpus"
SNIPPET_CHARS = 220


class NotInCorpus(ToolError):
    code, retryable = "not_found", False


class CorpusFormatError(ValueError):
    """A corpus file line that is not the expected JSON object (names file and line)."""


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    url: str
    text: str


@dataclass(frozen=True)
class CorpusImage:
    file: str
    title: str
    caption: str
    page_url: str


def _read_jsonl(path: Path, fields: Sequence[str]) -> list[dict[str, str]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusFormatError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(obj, dict) or any(not isinstance(obj.get(f), str) for f in fields):
            raise CorpusFormatError(f"{path}:{n}: needs string fields {', '.join(fields)}")
        rows.append(obj)
    return rows


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut + " ..."


class BM25Index:
    """bm25s over a list of texts; returns indices of documents with a positive score."""

    def __init__(self, texts: Sequence[str]):
        import bm25s  # imported here: it takes about a second and only the local backend needs it

        self._bm25s = bm25s
        self.size = len(texts)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)

    def top(self, query: str, k: int) -> list[int]:
        if self.size == 0:
            return []
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not any(len(ids) for ids in tokens.ids):
            return []
        idx, scores = self.retriever.retrieve(tokens, k=min(k, self.size), show_progress=False)
        return [int(i) for i, s in zip(idx[0], scores[0], strict=True) if s > 0]


class LocalCorpus:
    """Documents and captioned images loaded once and shared by the three local tools."""

    def __init__(self, root: Path, docs: list[Doc], images: list[CorpusImage]):
        self.root, self.docs, self.images = root, docs, images
        self.doc_index = BM25Index([f"{d.title}\n{d.text}" for d in docs])
        self.image_index = BM25Index([f"{i.title}\n{i.caption}" for i in images])
        self._by_url = {d.url.rstrip("/"): d for d in docs}

    @classmethod
    def load(cls, root: Path | str | None = None) -> LocalCorpus:
        root = Path(root) if root else BUILTIN_CORPUS
        docs = [Doc(**{k: r[k] for k in ("id", "title", "url", "text")})
                for r in _read_jsonl(root / "docs.jsonl", ("id", "title", "url", "text"))]
        images_file = root / "images.jsonl"
        images = ([CorpusImage(**{k: r[k] for k in ("file", "title", "caption", "page_url")})
                   for r in _read_jsonl(images_file, ("file", "title", "caption", "page_url"))]
                  if images_file.is_file() else [])
        for img in images:
            if not (root / "images" / img.file).is_file():
                raise CorpusFormatError(f"{images_file}: image file {root / 'images' / img.file} is missing")
        return cls(root, docs, images)

    def search_docs(self, query: str, k: int) -> list[Doc]:
        return [self.docs[i] for i in self.doc_index.top(query, k)]

    def search_images(self, query: str, k: int) -> list[CorpusImage]:
        return [self.images[i] for i in self.image_index.top(query, k)]

    def doc_by_url(self, url: str) -> Doc | None:
        return self._by_url.get(url.strip().rstrip("/"))

    def image_url(self, img: CorpusImage) -> str:
        return f"local://corpus/images/{img.file}"


class LocalSearch:
    name = "search"
    backend = "local"

    def __init__(self, cfg: ToolsConfig, corpus: LocalCorpus):
        self.cfg, self.corpus = cfg, corpus

    def schema(self) -> dict[str, Any]:
        return search_schema(self.cfg)

    def parse_args(self, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return parse_search_args(raw, self.cfg.search_top_k, self.cfg.search_max_top_k, self.cfg.search_max_queries)

    def cache_fields(self) -> dict[str, Any]:
        return {"corpus": str(self.corpus.root)}

    async def run(self, args: Mapping[str, Any], ctx: ToolContext) -> ToolOutput:
        blocks = []
        for q in args["queries"]:
            docs = self.corpus.search_docs(q, args["top_k"])
            organic = {"organic": [{"title": d.title, "link": d.url, "snippet": snippet(d.text)} for d in docs]}
            blocks.append(render_search_block(q, organic_hits(organic, args["top_k"])))
        return ToolOutput(text="\n\n".join(blocks))


class LocalImageSearch:
    name = "image_search"
    backend = "local"

    def __init__(self, cfg: ToolsConfig, corpus: LocalCorpus):
        self.cfg, self.corpus = cfg, corpus

    def schema(self) -> dict[str, Any]:
        return image_search_schema(self.cfg)

    def parse_args(self, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return parse_image_search_args(raw, self.cfg.image_top_k, self.cfg.image_max_results)

    def cache_fields(self) -> dict[str, Any]:
        return {"corpus": str(self.corpus.root), "jpeg_quality": self.cfg.image_jpeg_quality}

    async def run(self, args: Mapping[str, Any], ctx: ToolContext) -> ToolOutput:
        found = self.corpus.search_images(args["query"], args["top_k"])
        hits = []
        for img in found:
            data = await asyncio.to_thread((self.corpus.root / "images" / img.file).read_bytes)
            digest = await store_image_bytes(data, ctx, self.cfg)
            hits.append(ImageHit(title=img.title, url=self.corpus.image_url(img), page_url=img.page_url, sha256=digest))
        if not hits:
            return ToolOutput(text=no_results_text(args["query"], Counter()))
        return ToolOutput(text="", hits=tuple(hits))


class LocalBrowse:
    name = "browse"
    backend = "local"

    def __init__(self, cfg: ToolsConfig, corpus: LocalCorpus):
        self.cfg, self.corpus = cfg, corpus

    def schema(self) -> dict[str, Any]:
        return browse_schema(self.cfg)

    def parse_args(self, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return parse_browse_args(raw, self.cfg.max_urls_per_browse)

    def cache_fields(self) -> dict[str, Any]:
        return {"corpus": str(self.corpus.root)}

    async def run(self, args: Mapping[str, Any], ctx: ToolContext) -> ToolOutput:
        texts, errors = [], []
        for url in args["url"]:
            doc = self.corpus.doc_by_url(url)
            if doc is None:
                err = NotInCorpus(f"{url} is not a page of the local corpus")
                errors.append(str(err))
                texts.append(f"Browse error for {url}: {err}. Use a URL returned by search.")
                continue
            body = doc.text[: self.cfg.max_page_chars]
            texts.append(f"Page: {doc.title} ({doc.url})\n{body}")
        return ToolOutput(text=URL_SEPARATOR.join(texts), error="; ".join(errors) or None,
                          error_code=NotInCorpus.code if errors else None)
