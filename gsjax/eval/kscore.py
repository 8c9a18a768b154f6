"""K-Score, a pure function of judged samples (spec training_and_eval.md §6.3).

Per group: dimension means (rounded to 4), text accuracy averaged only over samples that need
readable text, overall = 0.1 f + 0.4 v + 0.4 t + 0.1 a; the final score is the macro average
of the two groups, x 100. Two conventions:
- strict (gsjax's primary, agent.md §8 item 9): every sample counts; a failed judgement or
  generation scores 0 on all four dimensions (and needs text, so it enters the text mean);
- upstream: failures are excluded (reported for comparison with the paper).
Unknown categories are excluded from both and listed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

GROUPS: dict[str, tuple[str, ...]] = {
    "science_and_knowledge": (
        "astronomy", "biology", "chemistry", "physics", "engineering", "medicine", "industry", "architecture",
        "history", "geography", "religion", "politics", "culture", "art", "sports",
    ),
    "pop_culture_and_news": (
        "anime", "game", "film", "celebrities", "posters", "multi-subject-anime", "multi-subject-celebrities",
        "multi-subject-game", "news",
    ),
}
CATEGORY_GROUP = {cat: group for group, cats in GROUPS.items() for cat in cats}
DIMENSIONS = ("faithfulness", "visual_correctness", "text_accuracy", "aesthetics")
WEIGHTS = {"faithfulness": 0.1, "visual_correctness": 0.4, "text_accuracy": 0.4, "aesthetics": 0.1}
CONVENTIONS = ("strict", "upstream")
TEXT_NA_DEFAULT = 0.5


@dataclass(frozen=True)
class JudgedSample:
    """One benchmark sample after judging; `scores` is None when it failed anywhere upstream."""

    id: str
    category: str
    difficulty: str | None
    scores: Mapping[str, object] | None
    error: str | None = None
    backend: str | None = None  # what judged it ("openai-compatible", "heuristic"), when known

    @property
    def group(self) -> str | None:
        return CATEGORY_GROUP.get(self.category.lower())


def _mean4(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 4)


def dimension_scores(samples: Sequence[JudgedSample], *, failures_as_zero: bool) -> dict[str, float | int]:
    """Dimension means and overall of one set of samples under one convention (empty -> all 0)."""
    rows: list[tuple[float, float, float | None, float]] = []
    for s in samples:
        if s.scores is not None:
            sc = s.scores
            na = bool(sc.get("text_accuracy_na"))
            rows.append((float(sc["faithfulness"]), float(sc["visual_correctness"]),
                         None if na else float(sc["text_accuracy"]), float(sc["aesthetics"])))
        elif failures_as_zero:
            rows.append((0.0, 0.0, 0.0, 0.0))
    if not rows:
        return {**dict.fromkeys(DIMENSIONS, 0.0), "overall": 0.0, "count": 0}
    texts = [r[2] for r in rows if r[2] is not None]
    means = {
        "faithfulness": _mean4([r[0] for r in rows]),
        "visual_correctness": _mean4([r[1] for r in rows]),
        "text_accuracy": _mean4(texts) if texts else TEXT_NA_DEFAULT,
        "aesthetics": _mean4([r[3] for r in rows]),
    }
    overall = round(sum(WEIGHTS[d] * means[d] for d in DIMENSIONS), 4)
    return {**means, "overall": overall, "count": len(rows)}


def convention_scores(samples: Sequence[JudgedSample], *, failures_as_zero: bool) -> dict[str, object]:
    """Both groups, their macro average `overall_avg`, and the K-Score (= 100 x overall)."""
    groups = {
        g: dimension_scores([s for s in samples if s.group == g], failures_as_zero=failures_as_zero) for g in GROUPS
    }
    a, b = groups.values()
    avg = {k: round((a[k] + b[k]) / 2, 4) for k in (*DIMENSIONS, "overall")}
    avg["count"] = a["count"] + b["count"]
    return {"groups": groups, "overall_avg": avg, "kscore": round(100 * avg["overall"], 2)}


def _by_convention(samples: Sequence[JudgedSample]) -> dict[str, dict[str, object]]:
    return {c: convention_scores(samples, failures_as_zero=c == "strict") for c in CONVENTIONS}


def kscore_report(samples: Sequence[JudgedSample]) -> dict[str, object]:
    """Everything `score` reports: both conventions, per category, per difficulty, failures."""
    known = [s for s in samples if s.group is not None]
    failed = [s for s in known if s.scores is None]
    categories = sorted({s.category.lower() for s in known}, key=lambda c: (CATEGORY_GROUP[c], c))
    difficulties = sorted({s.difficulty or "unspecified" for s in known})
    headline = _by_convention(known)
    return {
        **headline,
        "kscore_strict": headline["strict"]["kscore"],
        "kscore_upstream": headline["upstream"]["kscore"],
        "per_category": {
            cat: {c: dimension_scores([s for s in known if s.category.lower() == cat], failures_as_zero=c == "strict")
                  for c in CONVENTIONS}
            for cat in categories
        },
        "per_difficulty": {
            d: _by_convention([s for s in known if (s.difficulty or "unspecified") == d]) for d in difficulties
        },
        "samples": len(samples),
        "judge_backends": dict(Counter(s.backend for s in samples if s.backend)),
        "failures": {
            "count": len(failed),
            "by_reason": dict(Counter((s.error or "unknown").split(":")[0] for s in failed)),
            "ids": [s.id for s in failed],
        },
        "unknown_category": {
            "count": len(samples) - len(known),
            "ids": [s.id for s in samples if s.group is None],
        },
    }
