"""Minimal safetensors reader/writer on numpy memory maps (bf16 via ml_dtypes), no torch.

Reading memory-maps each file, so a tensor (or a slice of one, for sharded loading) is read from
disk only when touched. Writing goes to a temporary file renamed into place, so a kill never leaves
a half-written shard.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from gsjax.errors import InputFileNotFound

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsFile:
    """One .safetensors file: header parsed once, tensors served as read-only memory-mapped arrays."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: corrupt safetensors header: {e}") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        self._data_start = 8 + header_len
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return _DTYPES[self.entries[key]["dtype"]]

    def get(self, key: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self.entries[key]
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {e['dtype']}")
        start, stop = (self._data_start + o for o in e["data_offsets"])
        return self._mmap[start:stop].view(_DTYPES[e["dtype"]]).reshape(e["shape"])


class CheckpointReader:
    """All tensors of an HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / INDEX_NAME
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = {name: SafetensorsFile(directory / name) for name in sorted(set(weight_map.values()))}
            self._where = {k: files[v] for k, v in weight_map.items()}
        elif (directory / SINGLE_NAME).exists():
            single = SafetensorsFile(directory / SINGLE_NAME)
            self._where = {k: single for k in single.keys()}
        else:
            raise InputFileNotFound(f"{directory}: neither {SINGLE_NAME} nor {INDEX_NAME} found")
        self.directory = directory

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def get(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(f"{self.directory}: checkpoint has no tensor {key!r}")
        return self._where[key].get(key)


def _serialise_header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, arr in tensors.items():
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {key!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data section 8-byte aligned


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write atomically: to `<path>.tmp`, fsync, then rename."""
    path = Path(path)
    header = _serialise_header(tensors, metadata)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_plan(sizes: Mapping[str, int], max_shard_bytes: int) -> Iterator[list[str]]:
    """Greedy split of keys (in order) into shards of at most max_shard_bytes (a big tensor alone)."""
    shard: list[str] = []
    total = 0
    for key, size in sizes.items():
        if shard and total + size > max_shard_bytes:
            yield shard
            shard, total = [], 0
        shard.append(key)
        total += size
    if shard:
        yield shard
