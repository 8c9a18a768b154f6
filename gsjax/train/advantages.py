"""Outcome-GRPO group advantages and the bookkeeping of episodes left out of the loss (spec
training_and_eval.md §3.2, §3.5; agent.md §8 items 2, 8).

For the rollouts of one prompt with scalar rewards r_1..r_n:
    A_i = (r_i - mean) / (std + eps)   (std with ddof = 1, as torch.std)   norm_by_std=True
    A_i = r_i - mean                                                      norm_by_std=False (Dr.GRPO)

gsjax rules. Statistics use only rollouts whose reward is present: a *missing* reward (None / NaN, an
infrastructure failure) or an episode with a failure reason is excluded from the statistics and the loss,
and counted by reason — never given 0. Zero-reward rollouts (the policy's own failures) stay in with
their negative advantage (upstream dropped them). A group whose present rewards are all equal, or that
has fewer than 2 present rewards, carries no signal: `all_equal="zero"` keeps its rows with advantage 0,
`all_equal="drop"` excludes them (reason `zero_variance_group`). Only when the configured group size is
1 does a lone rollout get mean 0 and std 1 (upstream's size-1 rule). `drop_nonpositive` reproduces
upstream's mask of every rollout with reward <= 0, for ablations. Excluded rows get advantage NaN so that
using one by mistake is loud.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

AllEqual = Literal["zero", "drop"]
MISSING_REWARD = "missing_reward"
ZERO_VARIANCE = "zero_variance_group"
NONPOSITIVE = "nonpositive_reward"


@dataclass
class ExcludedEpisodes:
    """How many episodes were left out of the loss, by reason (for metrics and logs)."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str, n: int = 1) -> None:
        if not reason:
            raise ValueError("an excluded episode needs a reason")
        self.counts[reason] += n

    def merge(self, other: ExcludedEpisodes) -> ExcludedEpisodes:
        return ExcludedEpisodes(self.counts + other.counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_metrics(self, prefix: str = "excluded/") -> dict[str, int]:
        return {f"{prefix}{reason}": n for reason, n in sorted(self.counts.items())} | {f"{prefix}total": self.total}


@dataclass(frozen=True)
class GroupAdvantages:
    """Per-rollout advantages (NaN where excluded), the keep mask, and why the others were excluded."""

    advantages: np.ndarray  # (n,) float64
    keep: np.ndarray  # (n,) bool: the rollout enters the loss
    excluded: ExcludedEpisodes
    group_mean: dict[Hashable, float]
    group_std: dict[Hashable, float]  # ddof = 1 over present rewards (NaN under 2)

    def metrics(self) -> dict[str, float]:
        kept = self.advantages[self.keep]
        stds = [s for s in self.group_std.values() if not math.isnan(s)]
        return {"kept": int(self.keep.sum()), "advantage_abs_mean": float(np.abs(kept).mean()) if kept.size else 0.0,
                "groups": len(self.group_mean), "group_std_mean": float(np.mean(stds)) if stds else float("nan"),
                **self.excluded.as_metrics()}


def _as_rewards(rewards: Iterable[float | None]) -> np.ndarray:
    return np.asarray([np.nan if r is None else float(r) for r in rewards], np.float64)


def group_advantages(rewards: Sequence[float | None], group_ids: Sequence[Hashable], eps: float = 1e-6,
                     all_equal: AllEqual = "zero", norm_by_std: bool = True, *,
                     failures: Sequence[str | None] | None = None, group_size: int | None = None,
                     drop_nonpositive: bool = False) -> GroupAdvantages:
    """Group-normalised advantages for one batch of rollouts (numpy, on the host).

    `rewards[i]` None or NaN = missing; `failures[i]` a reason string excludes rollout i whatever its
    reward (tool/generator/judge failures, timeouts); `group_size` is the configured n (1 turns on the
    size-1 rule).
    """
    r = _as_rewards(rewards)
    groups = list(group_ids)
    if len(groups) != r.size:
        raise ValueError(f"{r.size} rewards but {len(groups)} group ids")
    reasons = list(failures) if failures is not None else [None] * r.size
    if len(reasons) != r.size:
        raise ValueError(f"{r.size} rewards but {len(reasons)} failure entries")
    if all_equal not in ("zero", "drop"):
        raise ValueError(f"all_equal must be 'zero' or 'drop', got {all_equal!r}")
    excluded = ExcludedEpisodes()
    keep = np.ones(r.size, bool)
    for i, reason in enumerate(reasons):
        if reason:
            keep[i] = False
            excluded.add(reason)
        elif np.isnan(r[i]):
            keep[i] = False
            excluded.add(MISSING_REWARD)
    advantages = np.full(r.size, np.nan)
    means: dict[Hashable, float] = {}
    stds: dict[Hashable, float] = {}
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for g, rows in members.items():
        idx = np.asarray(rows)
        present = idx[keep[idx]]
        values = r[present]
        std = float(np.std(values, ddof=1)) if values.size >= 2 else float("nan")
        stds[g] = std
        if group_size == 1 and values.size == 1:
            mean, scale = 0.0, 1.0
        elif values.size < 2 or np.all(values == values[0]):
            means[g] = float(values.mean()) if values.size else float("nan")
            if all_equal == "drop":
                keep[present] = False
                excluded.add(ZERO_VARIANCE, int(present.size))
            else:
                advantages[present] = 0.0
            continue
        else:
            mean, scale = float(values.mean()), std
        means[g] = mean
        centred = values - mean
        advantages[present] = centred / (scale + eps) if norm_by_std else centred
    if drop_nonpositive:
        bad = keep & (r <= 0)
        keep[bad] = False
        if bad.any():
            excluded.add(NONPOSITIVE, int(bad.sum()))
    advantages[~keep] = np.nan
    return GroupAdvantages(advantages, keep, excluded, means, stds)


def merge_excluded(parts: Iterable[ExcludedEpisodes]) -> ExcludedEpisodes:
    """Sum the counts of several batches (e.g. over a run)."""
    out = ExcludedEpisodes()
    for part in parts:
        out = out.merge(part)
    return out


def reason_of(status: str, reason: str) -> str | None:
    """The exclusion reason of a reward outcome (`gsjax.rewards.dual.EpisodeReward` status/reason):
    the failure kind (text before the first ':', keeping a termination's name) for a missing reward,
    None for a scored or zero one."""
    if status != "missing":
        return None
    kind, _, detail = reason.partition(":")
    if kind == "termination" and detail:
        return f"termination_{detail}"
    return kind or MISSING_REWARD


def failure_reasons(outcomes: Iterable[Mapping[str, str]]) -> list[str | None]:
    """`reason_of` over reward records that carry `status` and `reason` (as `EpisodeReward.as_record()`)."""
    return [reason_of(str(o.get("status", "")), str(o.get("reason", ""))) for o in outcomes]
