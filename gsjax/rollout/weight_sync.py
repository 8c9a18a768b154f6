"""Weight sync from the JAX learner into an SGLang(-compatible) server (ARCHITECTURE.md, "Weight sync").

1. The learner's weights are written as an HF-layout bf16 safetensors directory into a *staging* folder,
   fsynced, stamped with a marker file, and renamed into `<root>/<seq>-<version>`: a reader (SGLang, or a
   listing) sees a complete directory or none. Folders without the marker are never treated as weights.
2. The server is paused, its cache flushed (retried: SGLang refuses while requests still run), the directory
   loaded with `update_weights_from_disk` carrying the new weight version, the served version verified,
   and generation continued (always, even after a failure).
3. On a failed load or a wrong served version the last good directory is loaded back (with its version),
   so the server never keeps serving half-loaded or unknown weights; then `WeightSyncError` is raised.
4. Old directories are pruned to the newest `keep`, never removing the one being served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gsjax.rollout.engine import EngineError

log = logging.getLogger(__name__)

MARKER = "gsjax_weights.json"
_STAGING_PREFIX = ".staging-"


class WeightSyncError(EngineError):
    """A sync failed. `rolled_back_to` names the version the server serves again (None if that failed too)."""

    def __init__(self, message: str, version: str, rolled_back_to: str | None):
        self.version, self.rolled_back_to = version, rolled_back_to
        super().__init__(message)


class WeightServer(Protocol):
    """The management calls a sync needs (`SGLangClient` implements them over HTTP)."""

    def pause_generation(self, mode: str = "abort") -> None: ...

    def flush_cache(self) -> bool: ...

    def update_weights_from_disk(self, model_path: str, weight_version: str,
                                 load_format: str | None = None) -> tuple[bool, str]: ...

    def weight_version(self) -> str: ...

    def continue_generation(self) -> None: ...


@dataclass(frozen=True)
class WeightSyncConfig:
    """`pause_mode` is SGLang's: `abort` returns running requests as aborted, `retract`/`in_place` keep them."""

    keep: int = 3
    pause_mode: str = "abort"
    flush_attempts: int = 20
    flush_delay_s: float = 0.5
    flush_max_delay_s: float = 5.0
    load_format: str | None = None
    verify_version: bool = True

    def __post_init__(self) -> None:
        if self.keep < 1 or self.flush_attempts < 1:
            raise ValueError("WeightSyncConfig: keep and flush_attempts must be >= 1")


@dataclass(frozen=True)
class WeightDir:
    version: str
    path: Path
    seq: int


def _dir_name(seq: int, version: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", version)[:80]
    if safe != version:
        safe += "-" + hashlib.sha256(version.encode()).hexdigest()[:8]
    return f"{seq:06d}-{safe}"


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, so the rename publishes durable contents."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionedDirs:
    """Numbered, marker-stamped weight directories under one root, owned by one writer."""

    def __init__(self, root: str | Path, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep = Path(root), keep
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"{_STAGING_PREFIX}*"):  # a writer killed mid-export left these
            shutil.rmtree(stale, ignore_errors=True)

    def dirs(self) -> list[WeightDir]:
        """Complete directories, oldest first. Anything without a readable marker is ignored."""
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                marker = json.loads((path / MARKER).read_text())
                found.append(WeightDir(str(marker["version"]), path, int(marker["seq"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(found, key=lambda d: d.seq)

    def write(self, version: str, write: Callable[[Path], Any]) -> WeightDir:
        """`write(path)` creates the HF directory at `path` (inside staging); it appears under the root only
        once complete and durable."""
        seq = max((d.seq for d in self.dirs()), default=0) + 1
        final = self.root / _dir_name(seq, version)
        staging = self.root / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            target = staging / "weights"
            write(target)
            if not target.is_dir():
                raise EngineError(f"the weight writer did not create {target}")
            marker = {"version": version, "seq": seq, "created": time.time()}
            (target / MARKER).write_text(json.dumps(marker))
            _fsync_tree(target)
            os.rename(target, final)
            _fsync_dir(self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return WeightDir(version, final, seq)

    def prune(self, protect: Collection[Path] = ()) -> list[Path]:
        """Remove all but the newest `keep` directories, never one in `protect`; the removed paths."""
        keep_paths = {Path(p).resolve() for p in protect}
        dirs = self.dirs()
        removed = []
        for d in dirs[: max(0, len(dirs) - self.keep)]:
            if d.path.resolve() in keep_paths:
                continue
            # rename first so a concurrent listing never sees a half-deleted directory with its marker
            doomed = d.path.with_name(f"{_STAGING_PREFIX}{uuid.uuid4().hex}")
            os.rename(d.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(d.path)
        return removed


def export_model_hf(params: Any, directory: Path) -> None:
    """The default exporter: a gsjax `Qwen3VL` model -> HF-layout bf16 safetensors + config.json."""
    from gsjax.models.qwen3_vl.checkpoint import export_hf
    from gsjax.models.qwen3_vl.model import Qwen3VL

    if not isinstance(params, Qwen3VL):
        raise EngineError(f"cannot export {type(params).__name__} as HF weights; pass the model, an HF "
                          "directory, or an `exporter` that knows how")
    export_hf(params, directory, dtype="bfloat16")


class WeightSyncer:
    """Runs the sync protocol against one server and remembers the last directory it served well."""

    def __init__(self, server: WeightServer, dirs: VersionedDirs | None, config: WeightSyncConfig | None = None,
                 last_good: tuple[str, Path] | None = None, sleep: Callable[[float], None] = time.sleep):
        self.server, self.dirs = server, dirs
        self.config = config or WeightSyncConfig()
        self.last_good = last_good
        self.sleep = sleep

    def publish(self, version: str, write: Callable[[Path], Any]) -> Path:
        """Write new weights into a fresh versioned directory, then sync the server to it."""
        if self.dirs is None:
            raise EngineError("no weights root configured: cannot write new weight directories")
        written = self.dirs.write(version, write)
        self.sync_dir(version, written.path)
        return written.path

    def sync_dir(self, version: str, path: Path) -> None:
        """pause -> flush (retried) -> update_weights_from_disk -> verify -> continue; roll back on failure."""
        path = Path(path).resolve()
        failed = False
        try:
            self.server.pause_generation(self.config.pause_mode)
            self._flush(version)
            failure = self._load(version, path)
            if failure is not None:
                rolled_back = self._rollback(version)
                where = f"rolled back to {rolled_back!r}" if rolled_back else "rollback FAILED; server state unknown"
                raise WeightSyncError(f"weight sync to {version!r} from {path} failed: {failure}; {where}",
                                      version, rolled_back)
            self.last_good = (version, path)
        except BaseException:
            failed = True
            raise
        finally:
            self._continue(failed)
        if self.dirs is not None:
            removed = self.dirs.prune(protect=[path])
            if removed:
                log.info("pruned old weight directories: %s", [p.name for p in removed])

    def _continue(self, failed: bool) -> None:
        """Always resume generation; a failure to resume is raised unless it would hide the sync's own error."""
        try:
            self.server.continue_generation()
        except EngineError as exc:
            if not failed:
                raise
            log.error("continue_generation failed after a failed weight sync: %s", exc)

    def _flush(self, version: str) -> None:
        for attempt in range(self.config.flush_attempts):
            if self.server.flush_cache():
                return
            delay = min(self.config.flush_max_delay_s, self.config.flush_delay_s * 2**attempt)
            log.info("flush_cache refused (requests still running); retry %d in %.2f s", attempt + 1, delay)
            self.sleep(delay)
        # nothing was loaded yet: the server still serves the old weights, no rollback needed
        raise WeightSyncError(f"flush_cache still refused after {self.config.flush_attempts} attempts; weights "
                              f"{version!r} not loaded", version, self.last_good[0] if self.last_good else None)

    def _load(self, version: str, path: Path) -> str | None:
        """Load and verify; None on success, else what went wrong."""
        try:
            ok, message = self.server.update_weights_from_disk(str(path), version, self.config.load_format)
        except EngineError as exc:
            return f"update_weights_from_disk raised {exc}"
        if not ok:
            return f"update_weights_from_disk refused: {message}"
        if self.config.verify_version:
            try:
                served = self.server.weight_version()
            except EngineError as exc:
                return f"could not read the served weight version: {exc}"
            if served != version:
                return f"server reports weight version {served!r}, expected {version!r}"
        return None

    def _rollback(self, failed: str) -> str | None:
        if self.last_good is None:
            log.error("weight sync to %r failed and there is no last good directory to reload", failed)
            return None
        version, path = self.last_good
        log.warning("weight sync to %r failed; reloading last good %r from %s", failed, version, path)
        problem = self._load(version, path)
        if problem is not None:
            log.error("rollback to %r failed: %s", version, problem)
            return None
        return version
