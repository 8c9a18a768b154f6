"""File I/O shared by every package: atomic writes (a kill leaves the old file or the new one, never half)
and the one reader of record files (JSON array or JSON Lines) whose errors name the file and the line."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gsjax.errors import InputFileNotFound, RecordFileError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + fsync + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json_records(path: Path | str, what: str = "record file") -> list[Any]:
    """The values of a JSON array, or of JSON Lines (one per non-empty line), told apart by the first
    character. `what` names the file's role in the errors: a missing file is `InputFileNotFound`, broken
    JSON a `RecordFileError` with the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{what} not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordFileError(f"{path}:{exc.lineno}: not a JSON array ({exc.msg}, column {exc.colno})") from exc
        return records
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RecordFileError(f"{path}:{line_no}: not a JSON line ({exc})") from exc
    return records
