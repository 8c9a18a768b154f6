"""The reward gate: decide, before any generation or judging, whether an episode is scored,
gets reward 0, or gets no reward at all.

Upstream (spec training_and_eval.md §2.1) returns 0 for every failure. gsjax separates the
policy's failures (reward 0: it should learn to avoid them) from infrastructure and data
failures (reward *missing*: excluded from group statistics, agent.md §8 item 8). The checks
keep upstream's order; the reference range is 1..max_reference_images (agent.md §8 item 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

GateOutcome = Literal["pass", "zero", "missing"]

# Terminations that never reach the reward (agent.md §2.7): the policy's fault -> 0.
POLICY_TERMINATIONS = frozenset({"max_response_length_exceeded", "repeated_response", "answer_parse_failed", "no_answer"})
# Terminations caused by the harness, not the policy -> missing.
INFRA_TERMINATIONS = frozenset({"error", "timeout"})


@dataclass(frozen=True)
class GateVerdict:
    """`references` are the existing reference files, in answer order, when the gate passes."""

    outcome: GateOutcome
    reason: str
    references: tuple[Path, ...] = ()


def existing_references(prediction: Mapping) -> tuple[Path, ...]:
    """The `local_path` of each reference image whose file exists, in list order."""
    refs = prediction.get("reference_images") or []
    paths = (Path(r["local_path"]) for r in refs if isinstance(r, Mapping) and r.get("local_path"))
    return tuple(p for p in paths if p.is_file())


def check_gate(
    *,
    question: str | None,
    gt_image: str | Path | None,
    prediction: object,
    termination: str | None = None,
    min_references: int = 1,
    max_references: int = 3,
    judge_configured: bool = True,
) -> GateVerdict:
    """First failing check decides; `judge_configured` is False when the judge has no API key."""
    if termination in POLICY_TERMINATIONS:
        return GateVerdict("zero", f"termination:{termination}")
    if termination in INFRA_TERMINATIONS:
        return GateVerdict("missing", f"termination:{termination}")
    if not gt_image or not Path(gt_image).is_file():
        return GateVerdict("missing", f"gt_image_missing:{gt_image}")
    if not question or not str(question).strip():
        return GateVerdict("missing", "empty_question")
    if not isinstance(prediction, Mapping):
        return GateVerdict("zero", "no_prediction")
    if "error" in prediction:
        return GateVerdict("missing", f"prediction_error:{prediction['error']}")
    if not str(prediction.get("gen_prompt") or "").strip():
        return GateVerdict("zero", "empty_gen_prompt")
    refs = existing_references(prediction)
    high = max(max_references, min_references)
    if not min_references <= len(refs) <= high:
        return GateVerdict("zero", f"reference_count:{len(refs)} not in [{min_references}, {high}]")
    if not judge_configured:
        return GateVerdict("missing", "judge_not_configured")
    return GateVerdict("pass", "ok", refs)
