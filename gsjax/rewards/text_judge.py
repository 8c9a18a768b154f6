"""Text reward S_txt: a judge decides whether the agent's gen_prompt and chosen references would
let a perfect generator produce the ground-truth image. It rates evidence gathering, not pixels.

Spec training_and_eval.md §2.4. The judge sees the task prompt, the answer text and the
ground-truth image only (not the references, not the generated image).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gsjax.rewards.judge_client import (
    ImageSource,
    InvalidJudgeOutput,
    JudgeClient,
    JudgeRequest,
    JudgeResult,
)

RUBRIC_VERSION = "gsjax-text-v1"
LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
REFERENCE_FIELDS = ("img_id", "title", "note", "page_url")

SYSTEM_PROMPT = """You evaluate the text stage of a pipeline that feeds an image generator. An agent searched the web for a user's request and produced (a) a generation prompt, gen_prompt, and (b) a choice of reference images, each described by its id, title, note and source page.

Your question: would this gen_prompt together with this choice of references allow a perfect image generator to produce the ground-truth image (attached)? Judge from both sides: the textual side (are the right entities, attributes, readable text and relations spelled out correctly and specifically?) and the visual side (do the chosen references, as described, show the right subjects to copy identity from?). You do not see the reference images themselves, only their descriptions.

Score levels (use exactly one):
- 1.0: fully sufficient; nothing important is missing or wrong.
- 0.75: minor gaps only.
- 0.5: some key gaps, e.g. a key subject is missing, a reference is of the wrong kind, or required text is partly wrong.
- 0.25: much is missing or wrong.
- 0: does not support the ground truth at all.

Answer with ONE JSON object and nothing else, rationale first:
{"rationale": "Constraints: ... (5-10 sentences)", "score": 0.75}
The rationale is 5 to 10 sentences and starts with "Constraints:" followed by 2-5 constraints drawn from the task prompt and the ground-truth image."""


@dataclass(frozen=True)
class TextScore:
    """The snapped text score and the judge's rationale."""

    score: float
    rationale: str


class TextJudgeBackend(Protocol):
    """Anything that rates an answer (gen_prompt + references) against the ground truth."""

    def judge_text(
        self,
        sample_id: str,
        task_prompt: str,
        ground_truth: ImageSource,
        gen_prompt: str,
        reference_images: Sequence[Mapping],
    ) -> JudgeResult[TextScore]:
        """Rate how well the answer would let a perfect generator reproduce `ground_truth`."""


def snap_to_level(x: float) -> float:
    """Nearest of {0, 0.25, 0.5, 0.75, 1}; an exact tie goes to the lower level."""
    return min(LEVELS, key=lambda level: (abs(level - x), level))


def parse_text_score(obj: Mapping, *, strict: bool = True) -> TextScore:
    """Strict: `score` must be a number within [0, 1] before snapping; lenient clips."""
    raw = obj.get("score")
    if isinstance(raw, bool) or raw is None:
        raise InvalidJudgeOutput(f"score is missing or not a number: {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidJudgeOutput(f"score is not numeric: {raw!r}") from None
    if value != value or (strict and not 0.0 <= value <= 1.0):
        raise InvalidJudgeOutput(f"score={value} is outside [0, 1]")
    rationale = obj.get("rationale")
    return TextScore(snap_to_level(min(1.0, max(0.0, value))), rationale if isinstance(rationale, str) else "")


def format_answer_text(gen_prompt: str, reference_images: Sequence[Mapping]) -> str:
    """The answer as the judge reads it: gen_prompt JSON-encoded, then the reference list."""
    refs = [{k: ref.get(k, "") for k in REFERENCE_FIELDS} for ref in reference_images]
    return f'"gen_prompt": {json.dumps(gen_prompt, ensure_ascii=False)}\n"reference_images": {json.dumps(refs, indent=2, ensure_ascii=False)}'


def build_user_text(sample_id: str, task_prompt: str, answer_text: str) -> str:
    return (
        f"Sample id: {sample_id}\n"
        f"Task prompt (the original user request):\n{task_prompt}\n\n"
        "The attached image is the GROUND TRUTH.\n\n"
        f"Answer to evaluate:\n{answer_text}\n\n"
        "Return the JSON object with rationale and score."
    )


class TextJudge:
    """The text judge over an OpenAI-compatible vision API."""

    def __init__(self, client: JudgeClient, *, strict: bool = True) -> None:
        self.client = client
        self.strict = strict

    def judge_text(
        self,
        sample_id: str,
        task_prompt: str,
        ground_truth: ImageSource,
        gen_prompt: str,
        reference_images: Sequence[Mapping],
    ) -> JudgeResult[TextScore]:
        request = JudgeRequest(
            system=SYSTEM_PROMPT,
            user_text=build_user_text(sample_id, task_prompt, format_answer_text(gen_prompt, reference_images)),
            images=(ground_truth,),
            rubric_version=RUBRIC_VERSION if self.strict else RUBRIC_VERSION + "-lenient",
        )
        return self.client.judge(request, lambda obj: parse_text_score(obj, strict=self.strict))
