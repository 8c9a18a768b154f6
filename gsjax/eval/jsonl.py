"""Kill-safe, resumable record files: one JSON line per sample id, last record wins.

Every evaluation stage writes through a `RecordStore`, so a stage killed at any instant can be
rerun: finished ids are skipped, a half-written last line is dropped, and a retried id replaces
its old record (the file is compacted to one line per id when opened and when closed).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol, TypeVar

from gsjax.errors import InputError
from gsjax.fileio import atomic_write_text

Item = TypeVar("Item")


class CorruptRecordFile(InputError, ValueError):
    """A line in the middle of a record file is not JSON (a torn last line is repaired instead)."""


def record_key(value: object) -> str:
    """Ids are compared as strings: 3260 in one file and "3260" in another are one sample."""
    return str(value)


def write_json(path: Path, obj: object) -> None:
    atomic_write_text(Path(path), json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


class RecordStore:
    """A JSONL file keyed by `key`; appends are flushed and fsynced one whole line at a time."""

    def __init__(self, path: Path | str, key: str = "id") -> None:
        self.path = Path(path)
        self.key = key
        self._records: dict[str, dict] = {}
        self._dirty = False
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        torn = bool(lines and lines[-1].strip())  # no trailing newline: the last append was cut
        complete = lines[:-1]
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record_key(record[self.key])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorruptRecordFile(f"{self.path}:{number}: not a JSON record with {self.key!r} ({exc!r})") from exc
            self._dirty |= key in self._records
            self._records[key] = record
        if torn:
            try:
                record = json.loads(lines[-1])
                self._records[record_key(record[self.key])] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # half a line from a killed writer: that sample simply runs again
            self._dirty = True
        if self._dirty:
            self.compact()

    def __contains__(self, key: object) -> bool:
        return record_key(key) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: object) -> dict | None:
        return self._records.get(record_key(key))

    def records(self) -> list[dict]:
        return list(self._records.values())

    def put(self, record: dict) -> None:
        """Append one record; a second record for an id replaces the first (compacted later)."""
        key = record_key(record[self.key])
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            self._dirty |= key in self._records
            self._records[key] = record

    def compact(self) -> None:
        """Rewrite atomically with exactly one line per id."""
        with self._lock:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._records.values())
            atomic_write_text(self.path, text)
            self._dirty = False

    def close(self) -> None:
        if self._dirty:
            self.compact()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StageProgress(Protocol):
    """What a stage reports while it runs; the CLI renders it with rich."""

    def start(self, total: int, done: int) -> None:
        """`total` samples in the stage, `done` of them already finished before this run."""

    def advance(self, record: dict) -> None:
        """One more sample finished (successfully or not)."""


class _Silent:
    def start(self, total: int, done: int) -> None:
        return None

    def advance(self, record: dict) -> None:
        return None


def run_resumable(
    items: Sequence[Item],
    store: RecordStore,
    *,
    item_key: Callable[[Item], object],
    is_done: Callable[[dict], bool],
    work: Callable[[Item], dict],
    workers: int = 1,
    progress: StageProgress | None = None,
) -> None:
    """Run `work` on every item whose stored record is not done; store each result as it lands.

    `work` returns a record (failures included, marked by the stage); an exception it raises
    stops the stage after cancelling queued items, keeping every finished record.
    """
    progress = progress or _Silent()
    pending = [it for it in items if not ((rec := store.get(item_key(it))) is not None and is_done(rec))]
    progress.start(len(items), len(items) - len(pending))
    if workers <= 1:
        for item in pending:
            record = work(item)
            store.put(record)
            progress.advance(record)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        queue: Iterator[Item] = iter(pending)
        running: set[Future] = set()
        _refill(pool, queue, running, work, workers)
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            error = _store_finished(finished, store, progress)
            if error is not None:
                # Stop feeding work; let in-flight items finish so their results are kept too.
                _store_finished(wait(running).done, store, progress)
                raise error
            _refill(pool, queue, running, work, workers)


def _store_finished(finished: Iterable[Future], store: RecordStore, progress: StageProgress) -> BaseException | None:
    """Store every successful result; return the first exception among the rest."""
    error: BaseException | None = None
    for future in finished:
        exc = future.exception()
        if exc is None:
            record = future.result()
            store.put(record)
            progress.advance(record)
        elif error is None:
            error = exc
    return error


def _refill(pool: ThreadPoolExecutor, queue: Iterator, running: set[Future], work: Callable, workers: int) -> None:
    """Keep at most `workers` items in flight, so a failure leaves little queued work behind."""
    for item in _take(queue, workers - len(running)):
        running.add(pool.submit(work, item))


def _take(queue: Iterator, n: int) -> Iterable:
    for _ in range(max(0, n)):
        try:
            yield next(queue)
        except StopIteration:
            return
