"""The host side of the trained-positions-only LM head: which positions, padding, bucketed sizes."""

from __future__ import annotations

import numpy as np
import pytest

from gsjax.data.buckets import ladder_bucket
from gsjax.data.collate import MIN_LOSS_POSITIONS, loss_positions


def test_positions_in_order_padded_with_the_untrained_last_position():
    mask = np.zeros((3, 400), np.float32)
    mask[0, [5, 9, 10, 300]] = 1
    mask[1, 100:200] = 1  # the longest row: 100 -> K = 128
    out = loss_positions(mask)
    assert out.shape == (3, 128) and out.dtype == np.int32
    np.testing.assert_array_equal(out[0, :4], [5, 9, 10, 300])
    np.testing.assert_array_equal(out[1, :100], np.arange(100, 200))
    assert (out[0, 4:] == 399).all() and (out[1, 100:] == 399).all() and (out[2] == 399).all()


def test_no_compaction_when_it_would_not_shrink_the_row():
    mask = np.zeros((2, 128), np.float32)
    mask[0, :100] = 1
    assert loss_positions(mask) is None  # K = 128 is not below L = 128


def test_a_trained_last_position_is_refused():
    mask = np.zeros((1, 256), np.float32)
    mask[0, -1] = 1
    with pytest.raises(ValueError, match="last position"):
        loss_positions(mask)


def test_buckets_are_few_and_waste_under_a_half():
    sizes = sorted({ladder_bucket(n, MIN_LOSS_POSITIONS) for n in range(1, 5000)})
    assert sizes[:6] == [64, 96, 128, 192, 256, 384] and len(sizes) < 20
    assert all(ladder_bucket(n, MIN_LOSS_POSITIONS) < 1.5 * n + 64 for n in range(1, 5000))


def test_configured_sizes_pick_the_smallest_that_holds_else_a_multiple_of_the_largest():
    mask = np.zeros((2, 2000), np.float32)
    mask[0, 10:110] = 1  # 100 trained targets
    assert loss_positions(mask, (96, 384)).shape == (2, 384)
    mask[1, 500:1300] = 1  # 800: past the largest size, so two of it
    out = loss_positions(mask, (96, 384))
    assert out.shape == (2, 1152)
    np.testing.assert_array_equal(out[1, :800], np.arange(500, 1300))
    assert (out[1, 800:] == 1999).all()
    assert loss_positions(mask, (2048,)) is None  # not below L
