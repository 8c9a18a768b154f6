"""Per-step GRPO metrics from the step's rollouts (pure functions over host data).

Rewards are summarised over the rollouts that have one (a missing reward is a counted exclusion, not a
0); per component (`image`, `text`) over the rollouts where the component was computed. Episode shape:
tokens, sampled tokens, policy turns, tool calls, images; terminations and exclusion reasons as counts;
the share of rollouts sampled under an older weight version than the step's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _stats(prefix: str, values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {f"{prefix}_count": 0.0}
    arr = np.asarray(values, np.float64)
    return {f"{prefix}_mean": float(arr.mean()), f"{prefix}_std": float(arr.std()), f"{prefix}_min": float(arr.min()),
            f"{prefix}_max": float(arr.max()), f"{prefix}_count": float(arr.size)}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def summary_metrics(summaries: Sequence[Mapping[str, Any]], version: str) -> dict[str, float]:
    """Reward per component, episode length / turns / tool calls, terminations, failures, staleness, from
    the rollouts' JSON summaries (`Rollout.summary`): what a multi-host run gathers from every host."""
    scored = [s["reward"] for s in summaries if s["reward"] is not None]
    rewards = [s["reward"]["reward"] for s in summaries
               if s["failure"] is None and s["reward"] is not None and s["reward"]["reward"] is not None]
    image = [r["image_reward"] for r in scored if r["image_reward"] is not None]
    text = [r["text_reward"] for r in scored if r["text_reward"] is not None]
    records = [s for s in summaries if s["has_record"]]
    out: dict[str, float] = {"rollouts": float(len(summaries))}
    out |= _stats("reward/total", rewards) | _stats("reward/image", image) | _stats("reward/text", text)
    out["reward/zero_frac"] = float(np.mean([v == 0 for v in rewards])) if rewards else 0.0
    out["episode/tokens_mean"] = _mean([s["tokens"] for s in records])
    out["episode/tokens_max"] = float(max((s["tokens"] for s in records), default=0))
    out["episode/sampled_tokens_mean"] = _mean([s["sampled_tokens"] for s in records])
    out["episode/images_mean"] = _mean([s["images"] for s in records])
    out["episode/turns_mean"] = _mean([s["turns"] for s in summaries])
    out["episode/tool_calls_mean"] = _mean([s["tool_calls"] for s in summaries])
    for name, count in sorted(Counter(s["termination"] for s in summaries).items()):
        out[f"termination/{name}"] = float(count)
    stale = [s for s in records if any(v != version for v in s["weight_versions"])]
    out["rollout/stale_frac"] = len(stale) / max(len(records), 1)
    return out


def group_metrics(rewards: Sequence[float | None], groups: Sequence[str]) -> dict[str, float]:
    """How many groups carry a signal (present rewards not all equal): a GRPO step learns only from those."""
    by_group: dict[str, list[float]] = {}
    for value, group in zip(rewards, groups):
        if value is not None:
            by_group.setdefault(group, []).append(value)
    mixed = sum(1 for values in by_group.values() if len(values) >= 2 and len(set(values)) > 1)
    return {"groups/total": float(len(set(groups))), "groups/with_signal": float(mixed)}
