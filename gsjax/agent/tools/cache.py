"""Record/replay cache of tool results, so evals and RL ablations can be re-run bit for bit (§8 item 12).

Layout under the cache root:
  entries/<key[:2]>/<key>.json   one tool result (text, image hits, error, notes) + what produced it
  images/<sha256>.jpg            every image any entry references, content-addressed

The key is sha256 of canonical JSON of (tool, backend, backend fields, normalised arguments), so the
same request hits the same entry whatever the endpoint's port or the argument order. Every file is
written tmp + os.replace: concurrent writers of one key each write a complete entry and the last one
wins; a killed writer leaves at most a stray temp file, never a half entry.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsjax.agent.config import CACHE_MODES
from gsjax.agent.images import ImageStore
from gsjax.fileio import atomic_write_bytes
from gsjax.agent.tools.base import CacheMiss, ToolError, ToolOutput

SCHEMA_VERSION = 1


class CacheCorrupt(ToolError):
    code, retryable = "cache_corrupt", False


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(tool: str, backend: str, fields: Mapping[str, Any], args: Mapping[str, Any]) -> str:
    """Deterministic key of one tool request; `args` must already be normalised by the tool."""
    blob = canonical_json({"v": SCHEMA_VERSION, "tool": tool, "backend": backend, "fields": dict(fields),
                           "args": dict(args)})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheHit:
    output: ToolOutput
    recorded_latency_s: float


class ToolCache:
    """Mode-aware store of tool outputs. `mode` is one of off / record / replay / replay-or-record."""

    def __init__(self, root: Path | str, mode: str):
        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode {mode!r} is not one of {', '.join(CACHE_MODES)}")
        self.root, self.mode = Path(root), mode
        self.images = ImageStore(self.root / "images")

    @property
    def reads(self) -> bool:
        return self.mode in ("replay", "replay-or-record")

    @property
    def writes(self) -> bool:
        return self.mode in ("record", "replay-or-record")

    def entry_path(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / f"{key}.json"

    def lookup(self, key: str, episode_images: ImageStore) -> CacheHit | None:
        """The recorded output with its images copied into the episode's store, or None.

        In replay-or-record mode an entry that recorded a failure counts as a miss, so transient
        errors are re-fetched; strict replay returns it as recorded."""
        path = self.entry_path(key)
        if not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            output = ToolOutput.from_record(rec["output"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CacheCorrupt(f"cache entry {path} is unreadable: {exc}") from None
        if self.mode == "replay-or-record" and output.error is not None:
            return None
        for hit in output.hits:
            if not self.images.has(hit.sha256):
                raise CacheCorrupt(f"cache entry {path} references missing image {self.images.path(hit.sha256)}")
            episode_images.copy_from(self.images, hit.sha256)
        return CacheHit(output=output, recorded_latency_s=float(rec.get("latency_s", 0.0)))

    def miss(self, key: str, tool: str, args: Mapping[str, Any]) -> CacheMiss:
        return CacheMiss(f"replay cache {self.root} has no entry for {tool} {canonical_json(dict(args))} "
                         f"(key {key}); record it first with --cache-mode record or replay-or-record")

    def record(self, key: str, tool: str, backend: str, fields: Mapping[str, Any], args: Mapping[str, Any],
               output: ToolOutput, latency_s: float, episode_images: ImageStore) -> None:
        """Store images first, then the entry, so an entry never points at an absent image."""
        for hit in output.hits:
            self.images.copy_from(episode_images, hit.sha256)
        rec = {"schema": SCHEMA_VERSION, "key": key, "tool": tool, "backend": backend, "fields": dict(fields),
               "args": dict(args), "output": output.to_record(), "latency_s": round(latency_s, 6),
               "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_bytes(self.entry_path(key), json.dumps(rec, ensure_ascii=False, indent=1).encode("utf-8"))
