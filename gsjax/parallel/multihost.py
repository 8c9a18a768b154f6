"""Host-local batches to global arrays, and global arrays back to every host, for multi-process runs.

In a multi-host job each process loads only its own rows of the global batch (the data plan gives every
host the same shapes). Token arrays become one global array split over the batch axes
(`make_array_from_process_local_data`). Image rows are different: the vision tower's inputs are one packed
list of patch rows for the whole batch, replicated, whose order must match the order in which the model
meets image tokens in the global (batch, sequence) layout. `global_vision` gathers every host's rows, drops
each host's padding, renumbers the per-image segments so that no two hosts' images attend to each other,
and concatenates them in the order the hosts' rows lie along the global batch axis.

Multi-host GRPO also needs small host-side collectives: each host's share of a step's prompts
(`host_block`), every host's rollout summaries (`allgather_json`) and counts (`host_totals`), and the rows a
host contributed to a global array back (`local_rows`).

With one process every function here is the plain single-host path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gsjax.errors import InputError
from gsjax.models.qwen3_vl.vision import VisionInputs, pad_vision
from gsjax.parallel.sharding import Rules, batch_parts, batch_sharding

T = TypeVar("T")


class MultiHostError(InputError, ValueError):
    """A layout that a multi-process run cannot place correctly."""


def global_batch_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This host's rows of an input as the global array (the batch axis is the one `sharding` splits)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def process_order(sharding: NamedSharding, global_shape: Sequence[int], batch_dim: int = 0) -> list[int]:
    """Process indices in the order their rows lie along the global batch axis.

    Each process must own one contiguous block of rows (true for meshes built over `jax.devices()`, whose
    devices are grouped by process); anything else would interleave hosts' rows and is refused.
    """
    blocks: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
        rows = index[batch_dim]
        start, stop, _ = rows.indices(global_shape[batch_dim])
        blocks.setdefault(device.process_index, set()).add((start, stop))
    spans = {}
    for process, parts in blocks.items():
        ordered = sorted(parts)
        for (_, stop), (start, _) in zip(ordered, ordered[1:]):
            if start > stop:
                raise MultiHostError(f"process {process} owns batch rows {ordered}, not one contiguous block; "
                                     "build the mesh over jax.devices() so each host's devices are adjacent")
        spans[process] = (ordered[0][0], max(stop for _, stop in ordered))
    order = sorted(spans, key=lambda p: spans[p])
    for a, b in zip(order, order[1:]):
        if spans[a][1] > spans[b][0]:
            raise MultiHostError(f"processes {a} and {b} own overlapping batch rows {spans[a]} and {spans[b]}: "
                                 "the batch axes must split rows across hosts")
    return order


def global_vision(local: VisionInputs, order: Sequence[int]) -> VisionInputs:
    """Every host's image rows as one packed, replicated input (identical on all hosts).

    Each host's rows are padded to the same count (the data plan agrees on it). Valid rows (segment id >= 0)
    of host `order[0]`, then `order[1]`, ... come first, then padding; segment ids are offset so they stay
    unique per image frame across hosts.
    """
    host = {name: np.asarray(getattr(local, name)) for name in VisionInputs.__dataclass_fields__}
    gathered = multihost_utils.process_allgather(host)  # each leaf (processes, rows, ...)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in host}
    next_segment = 0
    for process in order:
        segments = gathered["segment_ids"][process]
        valid = segments >= 0
        for name in host:
            rows = gathered[name][process][valid]
            if name == "segment_ids":
                rows = rows + next_segment
            parts[name].append(rows)
        next_segment += int(segments.max()) + 1 if valid.any() else 0
    total = host["segment_ids"].shape[0] * len(order)
    out = {}
    for name, pieces in parts.items():
        joined = np.concatenate(pieces)
        pad = np.full((total - joined.shape[0], *joined.shape[1:]), -1 if name == "segment_ids" else 0,
                      joined.dtype)
        out[name] = np.concatenate([joined, pad])
    return VisionInputs(**out)


def place_vision(vision: VisionInputs, mesh: Mesh, rules: Rules) -> VisionInputs:
    """The batch's vision inputs (global, identical on every host) on the mesh, rows split over the batch axes:
    each device runs the tower on 1/parts of the patch rows, where replicated rows would make every device
    encode every image of the global batch. Rows are padded (segment -1, never read) to whole 2x2 merge groups
    per device; the tower's math is unchanged, XLA only partitions it."""
    parts = batch_parts(mesh, rules)
    if parts > 1:
        rows = int(np.asarray(vision.segment_ids).shape[0])
        vision = pad_vision(vision, -(-rows // (4 * parts)) * 4 * parts)
    split = batch_sharding(mesh, 1, rules).spec[0] if parts > 1 else None

    def put(array: Any) -> jax.Array:
        array = np.asarray(array)
        sharding = NamedSharding(mesh, PartitionSpec(split, *([None] * (array.ndim - 1))))
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return jax.tree.map(put, vision)


def gather_to_hosts(tree):
    """Every array of `tree` in full on every host, as numpy (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def host_block(items: Sequence[T]) -> list[T]:
    """This process's contiguous share of `items` (process p takes the p-th of equal blocks)."""
    count, index = jax.process_count(), jax.process_index()
    if len(items) % count:
        raise MultiHostError(f"{len(items)} items do not split evenly over {count} processes")
    size = len(items) // count
    return list(items[index * size:(index + 1) * size])


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order (a collective)."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(gathered[p, :int(sizes[p, 0])]).decode()) for p in range(jax.process_count())]


def host_totals(values: Sequence[float]) -> list[float]:
    """Elementwise sums of every process's `values` (a collective; the values themselves with one process)."""
    if jax.process_count() == 1:
        return [float(v) for v in values]
    gathered = multihost_utils.process_allgather(np.asarray(values, np.float64).reshape(-1))
    return [float(v) for v in np.asarray(gathered).reshape(jax.process_count(), -1).sum(axis=0)]


def local_rows(array: jax.Array, batch_dim: int = 0) -> np.ndarray:
    """This process's contiguous block of a batch-sharded global array, as numpy (all of it with one process).

    The inverse of `global_batch_array`: each host gets back the rows it contributed."""
    if jax.process_count() == 1 or array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    shards = array.addressable_shards
    spans = [s.index[batch_dim].indices(array.shape[batch_dim])[:2] for s in shards]
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    shape = list(array.shape)
    shape[batch_dim] = stop - start
    out = np.zeros(shape, array.dtype)
    for shard in shards:
        index = list(shard.index)
        rows = index[batch_dim].indices(array.shape[batch_dim])
        index[batch_dim] = slice(rows[0] - start, rows[1] - start)
        out[tuple(index)] = np.asarray(shard.data)
    return out
