"""Group advantages (spec training_and_eval.md §3.2): ddof=1 std, epsilon, Dr.GRPO, degenerate groups, and
episodes excluded with a counted reason (never silently scored 0)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gsjax.train.advantages import (
    MISSING_REWARD,
    NONPOSITIVE,
    ZERO_VARIANCE,
    ExcludedEpisodes,
    failure_reasons,
    group_advantages,
    merge_excluded,
)


def direct(rewards: list[float], eps: float = 1e-6, by_std: bool = True) -> list[float]:
    """The spec's formula for one group, written out."""
    n = len(rewards)
    mu = sum(rewards) / n
    sigma = math.sqrt(sum((r - mu) ** 2 for r in rewards) / (n - 1))
    return [(r - mu) / (sigma + eps) if by_std else r - mu for r in rewards]


def test_two_groups_match_the_formula_with_ddof_1():
    a = [0.1, 0.5, 0.0, 0.9, 0.3, 0.45]
    b = [0.8, 0.2, 0.0, 0.0, 0.6, 0.1]
    out = group_advantages(a + b, ["a"] * 6 + ["b"] * 6)
    np.testing.assert_allclose(out.advantages, direct(a) + direct(b), rtol=1e-12)
    assert out.keep.all() and out.excluded.total == 0
    assert out.group_std["a"] == pytest.approx(np.std(a, ddof=1))
    # ddof=0 would differ by sqrt(6/5) at n = 6
    assert out.advantages[0] != pytest.approx((a[0] - np.mean(a)) / (np.std(a) + 1e-6))


def test_interleaved_groups_and_dr_grpo():
    rewards = [1.0, 0.0, 0.5, 0.25, 0.75, 0.0]
    groups = ["x", "y", "x", "y", "x", "y"]
    out = group_advantages(rewards, groups, norm_by_std=False)
    x, y = direct([1.0, 0.5, 0.75], by_std=False), direct([0.0, 0.25, 0.0], by_std=False)
    np.testing.assert_allclose(out.advantages, [x[0], y[0], x[1], y[1], x[2], y[2]])


def test_zero_rewards_stay_in_the_loss_with_negative_advantage():
    out = group_advantages([0.0, 0.0, 0.6, 0.0], ["g"] * 4)
    assert out.keep.all()
    assert np.all(out.advantages[[0, 1, 3]] < 0) and out.advantages[2] > 0


def test_missing_and_failed_episodes_are_excluded_and_counted():
    rewards = [0.4, None, 0.8, float("nan"), 0.0, 0.2]
    failures = [None, "generation_failed", None, None, "tool_failure", None]
    out = group_advantages(rewards, ["g"] * 6, failures=failures)
    present = [0.4, 0.8, 0.2]  # statistics over the present rewards only; the failed 0.0 is not one
    np.testing.assert_allclose(out.advantages[[0, 2, 5]], direct(present))
    assert out.keep.tolist() == [True, False, True, False, False, True]
    assert np.all(np.isnan(out.advantages[~out.keep]))
    assert dict(out.excluded.counts) == {"generation_failed": 1, MISSING_REWARD: 1, "tool_failure": 1}
    assert out.metrics()["excluded/total"] == 3 and out.metrics()["kept"] == 3


@pytest.mark.parametrize("policy", ["zero", "drop"])
def test_all_equal_groups_follow_the_config(policy):
    rewards = [0.5, 0.5, 0.5, 0.0, 1.0, 0.7, None]
    groups = ["same", "same", "same", "mixed", "mixed", "lonely", "lonely"]
    out = group_advantages(rewards, groups, all_equal=policy)
    np.testing.assert_allclose(out.advantages[[3, 4]], direct([0.0, 1.0]))
    degenerate = [0, 1, 2, 5]  # equal rewards, and a group left with one present reward
    if policy == "zero":
        assert out.keep[degenerate].all() and np.all(out.advantages[degenerate] == 0)
        assert dict(out.excluded.counts) == {MISSING_REWARD: 1}
    else:
        assert not out.keep[degenerate].any()
        assert dict(out.excluded.counts) == {MISSING_REWARD: 1, ZERO_VARIANCE: 4}


def test_group_size_one_uses_mean_zero_std_one():
    out = group_advantages([0.7, 0.2], ["a", "b"], group_size=1)
    np.testing.assert_allclose(out.advantages, [0.7 / (1 + 1e-6), 0.2 / (1 + 1e-6)])
    assert np.all(group_advantages([0.7, 0.2], ["a", "b"], group_size=6).advantages == 0)


def test_upstream_compat_drops_nonpositive_after_the_statistics():
    rewards = [0.0, 0.6, 0.3, 0.0]
    out = group_advantages(rewards, ["g"] * 4, drop_nonpositive=True)
    np.testing.assert_allclose(out.advantages[[1, 2]], np.asarray(direct(rewards))[[1, 2]])
    assert out.keep.tolist() == [False, True, True, False] and out.excluded.counts[NONPOSITIVE] == 2


def test_failure_reasons_from_reward_records_and_merging():
    records = [{"status": "scored", "reason": "ok"}, {"status": "zero", "reason": "no_prediction"},
               {"status": "missing", "reason": "generation_failed:HTTP 503"},
               {"status": "missing", "reason": "termination:timeout"}]
    assert failure_reasons(records) == [None, None, "generation_failed", "termination_timeout"]
    a, b = ExcludedEpisodes(), ExcludedEpisodes()
    a.add("x")
    b.add("x", 2)
    b.add("y")
    assert dict(merge_excluded([a, b]).counts) == {"x": 3, "y": 1}
    with pytest.raises(ValueError):
        a.add("")


def test_shape_errors():
    with pytest.raises(ValueError, match="group ids"):
        group_advantages([0.1, 0.2], ["a"])
    with pytest.raises(ValueError, match="all_equal"):
        group_advantages([0.1, 0.2], ["a", "a"], all_equal="keep")
