"""The one grain pipeline shape gsjax's loaders use: a pure function over a range of integers, optionally run
in worker processes.

Each element is a pure function of its integer (a record index, a step), so the output is the same for any
worker count and a position is just the next integer: resuming rebuilds the pipeline from there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
from absl import flags


def _absl_flags_ready() -> None:
    """grain's worker launcher reads absl flags; outside an absl app they are unparsed and reading raises."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def map_range(fn: Callable[[int], Any], start: int, stop: int, *, worker_count: int,
              worker_buffer_size: int) -> grain.IterDataset:
    """`fn(i)` for i in [start, stop), in order; in `worker_count` spawned processes when > 0 (fn must pickle)."""
    ds = grain.MapDataset.range(start, stop).map(fn)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if worker_count <= 0:
        return it
    _absl_flags_ready()
    options = grain.multiprocessing.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
    return it.mp_prefetch(options)
