"""The batch plan: buckets, seeded shuffle, epochs, host shards, vision row buckets, padding waste."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gsjax.data.buckets import (
    EMPTY,
    BatchPlan,
    assign_buckets,
    auto_vision_bucket,
    padding_waste,
    vision_row_bucket,
)

BUCKETS = (64, 128, 256, 512)


def _plan(n: int = 103, seed: int = 7, **overrides: Any) -> BatchPlan:
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 512, n)
    lengths[::17] = -1  # refused records
    kw = {"lengths": lengths, "vision_rows": rng.integers(0, 3, n) * 256, "buckets": BUCKETS, "batch_size": 4,
          "process_count": 1, "num_epochs": 3, "seed": seed, "shuffle": True, "drop_remainder": False}
    return BatchPlan(**(kw | overrides))


def _epoch_ids(plan: BatchPlan, epoch: int, process_index: int = 0) -> list[np.ndarray]:
    first = epoch * plan.steps_per_epoch
    return [plan.batch(s, process_index).record_ids for s in range(first, first + plan.steps_per_epoch)]


def test_assign_buckets() -> None:
    got = assign_buckets(np.array([1, 64, 65, 512, 513, -1]), BUCKETS)
    np.testing.assert_array_equal(got, [0, 0, 1, 3, EMPTY, EMPTY])


def test_every_row_fits_its_bucket_and_only_it() -> None:
    plan = _plan()
    for step in range(plan.num_steps):
        batch = plan.batch(step, 0)
        real = plan.lengths[batch.record_ids[batch.record_ids >= 0]]
        lower = ([0, *BUCKETS])[BUCKETS.index(batch.length)]
        assert real.size and np.all((real > lower) & (real <= batch.length))


def test_each_epoch_covers_every_valid_record_once_in_a_new_order() -> None:
    plan = _plan()
    valid = np.flatnonzero(plan.lengths >= 0)
    orders = []
    for epoch in range(plan.num_epochs):
        ids = np.concatenate(_epoch_ids(plan, epoch))
        ids = ids[ids >= 0]
        np.testing.assert_array_equal(np.sort(ids), valid)
        orders.append(ids)
    assert not np.array_equal(orders[0], orders[1])


def test_shuffle_is_deterministic_by_seed() -> None:
    same = [np.concatenate(_epoch_ids(_plan(seed=5), 0)) for _ in range(2)]
    other = np.concatenate(_epoch_ids(_plan(seed=6), 0))
    np.testing.assert_array_equal(same[0], same[1])
    assert not np.array_equal(same[0], other)
    plain = _plan(shuffle=False)
    assert [plain.batch(s, 0).length for s in range(plain.steps_per_epoch)] == sorted(
        plain.batch(s, 0).length for s in range(plain.steps_per_epoch))


def test_host_shards_are_disjoint_cover_and_agree_on_shapes() -> None:
    hosts = 3
    plans = [_plan(process_count=hosts) for _ in range(hosts)]
    assert len({p.num_steps for p in plans}) == 1
    for epoch in (0, 1):
        shards = [np.concatenate(_epoch_ids(p, epoch, h)) for h, p in enumerate(plans)]
        ids = np.concatenate(shards)
        ids = ids[ids >= 0]
        assert ids.size == np.unique(ids).size
        np.testing.assert_array_equal(np.sort(ids), np.flatnonzero(plans[0].lengths >= 0))
    for step in range(plans[0].num_steps):
        shapes = {(p.batch(step, h).length, p.batch(step, h).vision_rows) for h, p in enumerate(plans)}
        assert len(shapes) == 1


def test_drop_remainder_keeps_only_full_batches() -> None:
    plan = _plan(drop_remainder=True)
    assert all(np.all(ids >= 0) for ids in _epoch_ids(plan, 0))
    assert plan.steps_per_epoch < _plan().steps_per_epoch


def test_shapes_are_limited() -> None:
    plan = _plan(n=2000, num_epochs=1)
    shapes = {(plan.batch(s, 0).length, plan.batch(s, 0).vision_rows) for s in range(plan.num_steps)}
    assert {length for length, _ in shapes} <= set(BUCKETS)
    rows = {r for _, r in shapes if r is not None}
    assert len(rows) <= 8 and all(r % 4 == 0 for r in rows)


def test_vision_row_buckets() -> None:
    assert [auto_vision_bucket(r) for r in (1, 64, 65, 97, 129, 193, 1000)] == [64, 64, 96, 128, 192, 256, 1024]
    assert vision_row_bucket(300, (256, 512)) == 512
    assert vision_row_bucket(1100, (256, 512)) == 1536
    for rows in range(1, 5000, 37):
        size = auto_vision_bucket(rows)
        assert size >= rows and size % 4 == 0 and (size <= 64 or size < 1.5 * rows + 1)


def test_padding_waste_by_hand() -> None:
    plan = BatchPlan(lengths=np.array([100, 200, 60]), vision_rows=np.array([0, 0, 256]), buckets=(64, 256),
                     batch_size=2, process_count=1, num_epochs=1, seed=0, shuffle=False, drop_remainder=False)
    waste = padding_waste(plan)
    assert waste["batches"] == 2 and waste["lengths"] == [64, 256]
    assert waste["token_waste"] == pytest.approx(1 - 360 / (2 * 64 + 2 * 256))
    assert waste["vision_row_waste"] == pytest.approx(0.0)
