"""Length buckets and the batch plan: which records form each global batch, at which padded length.

Every host computes the same plan from the same index, so all hosts step through the same number of batches
and agree on each batch's sequence length and vision row count (SPMD needs equal shapes). A global batch holds
`batch_size * process_count` records of one bucket; host `p` takes every `process_count`-th slot starting at
`p`. Within an epoch records are shuffled (seeded by `(seed, epoch)`), dealt into their buckets in that order,
cut into full batches (a bucket's remainder becomes one batch padded with empty rows, or is dropped), and the
batches of all buckets are shuffled together. `padding_waste` measures what a plan pays for its few shapes.
All functions here are pure.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EMPTY = -1
"""Record id of an empty (all padding) row."""


def assign_buckets(lengths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    """Index of the smallest bucket >= each length; -1 for invalid (negative) lengths or over the last."""
    lengths = np.asarray(lengths)
    edges = np.asarray(buckets)
    idx = np.searchsorted(edges, lengths, side="left")
    return np.where((lengths >= 0) & (idx < len(edges)), idx, EMPTY).astype(np.int64)


def ladder_bucket(n: int, minimum: int) -> int:
    """Smallest of 2^k and 3 * 2^(k-1) (64, 96, 128, 192, ... from `minimum`) that holds `n`: at most a third
    is padding, with two shapes per doubling (below 8 only powers of two)."""
    size = int(minimum)
    while size < n:
        power_of_two = size & (size - 1) == 0
        size = size * 3 // 2 if power_of_two and size >= 8 else 1 << size.bit_length()
    return size


def auto_vision_bucket(rows: int, minimum: int = 64) -> int:
    """`ladder_bucket` for image patch rows. `minimum` must be a multiple of 4 (the tower merges 2 x 2
    patches)."""
    return ladder_bucket(rows, max(int(minimum), 4))


def configured_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest of the (increasing) `buckets` that holds `n`, else a multiple of the largest."""
    for bucket in buckets:
        if bucket >= n:
            return int(bucket)
    return int(-(-n // buckets[-1]) * buckets[-1])


def vision_row_bucket(rows: int, buckets: tuple[int, ...] | None, minimum: int = 64) -> int:
    """Rows to pad a host batch's vision input to: `configured_bucket`, or without configured buckets
    `auto_vision_bucket`."""
    return auto_vision_bucket(rows, minimum) if buckets is None else configured_bucket(rows, buckets)


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch)])


def epoch_batches(bucket_of: np.ndarray, num_buckets: int, global_batch: int, *, seed: int, epoch: int,
                  shuffle: bool, drop_remainder: bool) -> list[tuple[int, np.ndarray]]:
    """One epoch's global batches as (bucket index, record ids of length `global_batch`, EMPTY-padded)."""
    rng = _epoch_rng(seed, epoch)
    valid = np.flatnonzero(bucket_of >= 0)
    order = rng.permutation(valid) if shuffle else valid
    batches = []
    for b in range(num_buckets):
        members = order[bucket_of[order] == b]
        for start in range(0, len(members), global_batch):
            chunk = members[start:start + global_batch]
            if len(chunk) < global_batch:
                if drop_remainder:
                    break
                chunk = np.concatenate([chunk, np.full(global_batch - len(chunk), EMPTY, np.int64)])
            batches.append((b, chunk.astype(np.int64)))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def batches_per_epoch(bucket_of: np.ndarray, num_buckets: int, global_batch: int, drop_remainder: bool) -> int:
    """The same for every epoch: it depends on bucket sizes only, not on the shuffle."""
    sizes = np.bincount(bucket_of[bucket_of >= 0], minlength=num_buckets)
    per = sizes // global_batch if drop_remainder else -(-sizes // global_batch)
    return int(per.sum())


def host_slice(ids: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Host `process_index`'s rows of a global batch (strided, so a padded remainder spreads evenly)."""
    return ids[process_index::process_count]


@dataclass(frozen=True)
class PlannedBatch:
    """One host's batch as planned: the records of each row and the shapes every host shares."""

    step: int
    epoch: int
    length: int  # padded sequence length L
    record_ids: np.ndarray  # (batch_size,) EMPTY for padding rows
    vision_rows: int | None  # padded vision rows, None when no host has an image


@dataclass
class BatchPlan:
    """The deterministic plan over all epochs, identical on every host. `lengths`/`vision_rows` come from
    the record index; invalid records have length -1."""

    lengths: np.ndarray
    vision_rows: np.ndarray
    buckets: tuple[int, ...]
    batch_size: int
    process_count: int
    num_epochs: int
    seed: int
    shuffle: bool
    drop_remainder: bool
    vision_row_buckets: tuple[int, ...] | None = None
    min_vision_rows: int = 64
    _cache: dict[int, list[tuple[int, np.ndarray]]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, np.int64)
        self.vision_rows = np.asarray(self.vision_rows, np.int64)
        self.bucket_of = assign_buckets(self.lengths, self.buckets)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.process_count

    @property
    def steps_per_epoch(self) -> int:
        return batches_per_epoch(self.bucket_of, len(self.buckets), self.global_batch, self.drop_remainder)

    @property
    def num_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs

    def epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """Global batches of one epoch (memoised: workers ask for many steps of the same epoch)."""
        if epoch not in self._cache:
            self._cache.clear()
            self._cache[epoch] = epoch_batches(self.bucket_of, len(self.buckets), self.global_batch,
                                               seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                                               drop_remainder=self.drop_remainder)
        return self._cache[epoch]

    def batch(self, step: int, process_index: int) -> PlannedBatch:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside the plan's {self.num_steps} steps")
        epoch, within = divmod(step, self.steps_per_epoch)
        bucket, ids = self.epoch(epoch)[within]
        rows = np.where(ids >= 0, self.vision_rows[np.maximum(ids, 0)], 0)
        busiest = int(rows.reshape(self.batch_size, self.process_count).sum(axis=0).max())
        vision = vision_row_bucket(busiest, self.vision_row_buckets, self.min_vision_rows) if busiest else None
        return PlannedBatch(step=step, epoch=epoch, length=self.buckets[bucket],
                            record_ids=host_slice(ids, process_index, self.process_count), vision_rows=vision)

    def fingerprint(self) -> dict[str, object]:
        """What a saved iterator position is only valid for."""
        digest = hashlib.sha256(self.lengths.tobytes() + self.vision_rows.tobytes()).hexdigest()[:16]
        return {"records": int(self.lengths.size), "index_digest": digest, "valid": int((self.bucket_of >= 0).sum()),
                "buckets": list(self.buckets), "global_batch": self.global_batch, "num_epochs": self.num_epochs,
                "steps_per_epoch": self.steps_per_epoch, "seed": self.seed, "shuffle": self.shuffle,
                "drop_remainder": self.drop_remainder}


def padding_waste(plan: BatchPlan, epoch: int = 0) -> dict[str, Any]:
    """Token and vision-row waste of one epoch of `plan` (all hosts), and the distinct batch shapes used."""
    real = padded = rows_real = rows_padded = 0
    shapes = set()
    first = epoch * plan.steps_per_epoch
    for step in range(first, first + plan.steps_per_epoch):
        batch = plan.batch(step, 0)
        _, ids = plan.epoch(epoch)[step - first]
        valid = ids[ids >= 0]
        real += int(plan.lengths[valid].sum())
        padded += ids.size * batch.length
        rows_real += int(plan.vision_rows[valid].sum())
        rows_padded += (batch.vision_rows or 0) * plan.process_count
        shapes.add((batch.length, batch.vision_rows))
    return {"batches": plan.steps_per_epoch, "token_waste": 1 - real / padded if padded else 0.0,
            "vision_row_waste": 1 - rows_real / rows_padded if rows_padded else 0.0,
            "shapes": len(shapes), "lengths": sorted({s[0] for s in shapes})}


def unbucketed_waste(lengths: np.ndarray, global_batch: int, seed: int) -> dict[str, Any]:
    """Baseline: random batches, each padded to its own longest row."""
    valid = np.random.default_rng(seed).permutation(lengths[lengths >= 0])
    pad = -len(valid) % global_batch
    batches = np.concatenate([valid, np.zeros(pad, valid.dtype)]).reshape(-1, global_batch)
    padded = int(batches.max(axis=1).sum()) * global_batch
    return {"batches": len(batches), "token_waste": 1 - int(valid.sum()) / padded,
            "shapes": len(np.unique(batches.max(axis=1)))}
