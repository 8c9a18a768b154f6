"""Host-local batches to global arrays, and global arrays back to every host, for multi-process runs.

In a multi-host job each process loads only its own rows of the global batch (the data plan gives every
host the same shapes). Token arrays become one global array split over the batch axes
(`make_array_from_process_local_data`). Image rows are different: the vision tower's inputs are one packed
list of patch rows for the whole batch, replicated, whose order must match the order in which the model
meets image tokens in the global (batch, sequence) layout. `global_vision` gathers every host's rows, drops
each host's padding, renumbers the per-image segments so that no two hosts' images attend to each other,
and concatenates them in the order the hosts' rows lie along the global batch axis.

With one process every function here is the plain single-host path.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from gsjax.models.qwen3_vl.vision import VisionInputs


class MultiHostError(ValueError):
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


def gather_to_hosts(tree):
    """Every array of `tree` in full on every host, as numpy (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
