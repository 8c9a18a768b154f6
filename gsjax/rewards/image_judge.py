"""Image reward S_img: a vision judge scores a generated image against the ground truth on four
rubric dimensions, and a fixed weighted, rounded formula turns them into one number in [0, 1].

Same rubric for the RL reward and the KnowGen evaluation (spec training_and_eval.md §2.3, §6.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

from gsjax.rewards.judge_client import (
    ImageSource,
    InvalidJudgeOutput,
    JudgeClient,
    JudgeRequest,
    JudgeResult,
)

RUBRIC_VERSION = "gsjax-image-v1"
WEIGHTS = {"faithfulness": 0.1, "visual_correctness": 0.4, "text_accuracy": 0.4, "aesthetics": 0.1}
TEXT_NA_VALUE = 0.5
RATIONALE_MAX_CHARS = 1000
_NA_TRUE = (True, "true", "True", 1)

SYSTEM_PROMPT = """You are a strict evaluator of images that were generated for prompts requiring real-world knowledge (specific people, places, objects, events, logos, documents).

Inputs you receive:
- The task prompt: the ORIGINAL user request the image was meant to satisfy.
- Image 1: the GENERATED image. This is the image you score.
- Image 2: the GROUND-TRUTH image. It is only a reference for identity and grounded details.
All input images are AI-generated; none of them is a photograph of a real private person, so comparing faces and identities is expected and allowed.

This is not a pixel-similarity task. Layout, pose, camera angle and framing may differ from Image 2 without penalty. What matters is whether Image 1 shows the right real-world entities with their correct identifying details. A detail that cannot be verified in Image 1 earns a lower score, never the benefit of the doubt.

Procedure:
1. From the task prompt, list 2 to 5 hard constraints (entities, attributes, relations, required readable text).
2. Check Image 1 against each constraint.
3. Do a visual identity check against Image 2 (mandatory): compare the stable identifying features of each key entity.
4. Assign the four scores below.

Boundary between two dimensions: anything recognised by its look (a face, a logo's shape, an emblem's geometry, a building facade, a silhouette) belongs to visual_correctness; anything that must be READ (spelling, years, names, badge or jersey text, captions) belongs to text_accuracy.

Every score is exactly one of 0, 0.5 or 1. A 1 is exemplary and rare; 0.5 is conditional or partial; 0 is rejected.
- faithfulness: 1 if every requested element is present with the requested structure and relations, judged against the prompt rather than against Image 2's identity; 0.5 if some elements are missing or wrong; 0 if most are missing or wrong.
- visual_correctness: 1 if the stable identifying visual features match the ground truth; 0.5 only if the identity is clearly the right one with some visible deviations; 0 otherwise. Be extremely strict: a generic look-alike of the right type (archetype only, e.g. "a tall bridge" instead of that specific bridge) does NOT earn 0.5.
- text_accuracy: 1 if all required readable text is present, crisp and correct; 0.5 if it is mostly readable and generally correct with some errors or omissions; 0 if it is missing, unreadable or incorrect (any clearly incorrect required text gives 0). If the prompt needs no readable text at all, set text_accuracy_na to true and text_accuracy to 0.5.
- aesthetics: 1 only if the image is masterpiece-level and not worse than the ground truth; 0.5 if slightly worse than the ground truth; 0 if average or worse.

Answer with ONE JSON object and nothing else, in exactly this shape:
{"rationale": "Constraints: ... (5-10 sentences)", "faithfulness": 0.5, "visual_correctness": 0, "text_accuracy": 0.5, "aesthetics": 0.5, "text_accuracy_na": false}
The rationale comes first, is 5 to 10 sentences long, and its first word is "Constraints:" followed by the 2-5 constraints you listed."""


@dataclass(frozen=True)
class ImageScores:
    """Normalised judge scores; `text_accuracy` is 0.5 when the prompt needs no readable text."""

    faithfulness: float
    visual_correctness: float
    text_accuracy: float
    aesthetics: float
    text_accuracy_na: bool
    overall: float
    rationale: str

    def as_record(self) -> dict[str, object]:
        """The `scores` object of a judgement record (§6.2): rationale cut, N/A flag only when set."""
        record = asdict(self)
        record["rationale"] = self.rationale[:RATIONALE_MAX_CHARS]
        if not self.text_accuracy_na:
            record.pop("text_accuracy_na")
        return record


class ImageJudgeBackend(Protocol):
    """Anything that scores a generated image against its ground truth (model judge or heuristic)."""

    def judge_image(
        self, sample_id: str, task_prompt: str, generated: ImageSource, ground_truth: ImageSource
    ) -> JudgeResult[ImageScores]:
        """Score `generated` for `task_prompt`, with `ground_truth` as the identity reference."""


def clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def overall_score(f: float, v: float, t: float, a: float) -> float:
    """S_img = clip01(round(0.1 f + 0.4 v + 0.4 t + 0.1 a, 2))."""
    w = WEIGHTS
    return clip01(round(w["faithfulness"] * f + w["visual_correctness"] * v + w["text_accuracy"] * t + w["aesthetics"] * a, 2))


def _score(obj: Mapping, key: str, strict: bool) -> float:
    """One rubric value: must be numeric. Strict: present and within [0, 1]; else missing -> 0, clipped."""
    if key not in obj:
        if strict:
            raise InvalidJudgeOutput(f"judge reply lacks {key!r}")
        return 0.0
    raw = obj[key]
    if isinstance(raw, bool):
        raise InvalidJudgeOutput(f"{key} is a boolean ({raw!r}), not a score")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidJudgeOutput(f"{key} is not numeric: {raw!r}") from None
    if value != value:
        raise InvalidJudgeOutput(f"{key} is NaN")
    if strict and not 0.0 <= value <= 1.0:
        raise InvalidJudgeOutput(f"{key}={value} is outside [0, 1]")
    return round(clip01(value), 2)


def parse_image_scores(obj: Mapping, *, strict: bool = True) -> ImageScores:
    """Normalise a judge reply (§2.3). `strict=False` is upstream's leniency (missing -> 0, clip)."""
    f = _score(obj, "faithfulness", strict)
    v = _score(obj, "visual_correctness", strict)
    a = _score(obj, "aesthetics", strict)
    na = obj.get("text_accuracy_na") in _NA_TRUE
    if not na:
        try:
            t = _score(obj, "text_accuracy", strict)
        except InvalidJudgeOutput:
            if strict:
                raise
            na = True  # upstream: an unparsable text_accuracy counts as N/A
    if na:
        t = TEXT_NA_VALUE
    rationale = obj.get("rationale")
    return ImageScores(f, v, t, a, na, overall_score(f, v, t, a), rationale if isinstance(rationale, str) else "")


def build_user_text(sample_id: str, task_prompt: str) -> str:
    return (
        f"Sample id: {sample_id}\n"
        f"Task prompt (the original user request):\n{task_prompt}\n\n"
        "Image 1 (first attached) is the GENERATED image to score. "
        "Image 2 (second attached) is the GROUND-TRUTH reference.\n"
        "Return the JSON object with rationale, faithfulness, visual_correctness, text_accuracy, "
        "aesthetics and text_accuracy_na."
    )


class ImageJudge:
    """The image judge over an OpenAI-compatible vision API."""

    def __init__(self, client: JudgeClient, *, strict: bool = True) -> None:
        self.client = client
        self.strict = strict

    def judge_image(
        self, sample_id: str, task_prompt: str, generated: ImageSource, ground_truth: ImageSource
    ) -> JudgeResult[ImageScores]:
        request = JudgeRequest(
            system=SYSTEM_PROMPT,
            user_text=build_user_text(sample_id, task_prompt),
            images=(generated, ground_truth),
            rubric_version=RUBRIC_VERSION if self.strict else RUBRIC_VERSION + "-lenient",
        )
        return self.client.judge(request, lambda obj: parse_image_scores(obj, strict=self.strict))
