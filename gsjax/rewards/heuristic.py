"""An OFFLINE, HEURISTIC judge backend for demos and tests: no model is called.

Scores come from image statistics (pixel and colour-histogram similarity to the ground truth,
contrast) and keyword overlap. They are deterministic but say nothing about knowledge or
identity, so every result is labelled `backend="heuristic"` and its rationale starts with
"HEURISTIC" so that no report can pass them off as judge-model scores.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from gsjax.rewards.image_judge import ImageScores, overall_score
from gsjax.rewards.judge_client import ImageSource, JudgeFailure, JudgeResult, read_image_bytes
from gsjax.rewards.text_judge import TextScore, snap_to_level

BACKEND = "heuristic"
IMAGE_MODEL = "heuristic-image-stats-v1"
TEXT_MODEL = "heuristic-keyword-overlap-v1"
LABEL = "HEURISTIC (no judge model; image statistics / keyword overlap, not comparable to model-judge scores)"
_THUMB = 32
_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    "the a an and or of in on at to for with from by as is are be this that these those its it his her their "
    "image picture photo show shows showing depict depicting create generate".split()
)


def _thumb(source: ImageSource) -> np.ndarray:
    with Image.open(io.BytesIO(read_image_bytes(source))) as img:
        return np.asarray(img.convert("RGB").resize((_THUMB, _THUMB), Image.BILINEAR), dtype=np.float64) / 255.0


def _histogram(pixels: np.ndarray, bins: int = 8) -> np.ndarray:
    hist = np.concatenate([np.histogram(pixels[..., ch], bins=bins, range=(0, 1))[0] for ch in range(3)])
    return hist / hist.sum()


def _grade(x: float, full: float, half: float) -> float:
    return 1.0 if x >= full else 0.5 if x >= half else 0.0


def image_statistics(generated: ImageSource, ground_truth: ImageSource) -> dict[str, float]:
    """Pixel similarity, colour-histogram overlap and contrast ratio, each in [0, 1]."""
    gen, gt = _thumb(generated), _thumb(ground_truth)
    pixel = 1.0 - float(np.abs(gen - gt).mean())
    hist = float(np.minimum(_histogram(gen), _histogram(gt)).sum() / 3.0)
    gen_std, gt_std = float(gen.mean(axis=2).std()), float(gt.mean(axis=2).std())
    contrast = 1.0 if gt_std == 0 else min(1.0, gen_std / gt_std)
    return {"pixel_similarity": round(pixel, 4), "histogram_overlap": round(hist, 4), "contrast_ratio": round(contrast, 4)}


def keywords(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in _STOPWORDS}


def _failure(model: str, rubric: str, exc: Exception) -> JudgeResult:
    failure = JudgeFailure("unreadable_input", f"{type(exc).__name__}: {exc}", 1, ("unreadable_input",))
    return JudgeResult(None, failure, model=model, rubric_version=rubric, backend=BACKEND, attempts=1)


class HeuristicImageJudge:
    """Image 'judge' from image statistics; text accuracy is always N/A (it cannot read)."""

    rubric_version = "heuristic-image-v1"

    def judge_image(
        self, sample_id: str, task_prompt: str, generated: ImageSource, ground_truth: ImageSource
    ) -> JudgeResult[ImageScores]:
        try:
            stats = image_statistics(generated, ground_truth)
        except (OSError, ValueError) as exc:
            return _failure(IMAGE_MODEL, self.rubric_version, exc)
        v = _grade(stats["pixel_similarity"], 0.92, 0.8)
        f = _grade(stats["histogram_overlap"], 0.85, 0.6)
        a = _grade(stats["contrast_ratio"], 1.01, 0.8)  # never 1: "masterpiece" is not measurable
        t = 0.5
        rationale = f"{LABEL}. Sample {sample_id}: " + ", ".join(f"{k} {v_:.3f}" for k, v_ in stats.items()) + "."
        scores = ImageScores(f, v, t, a, True, overall_score(f, v, t, a), rationale)
        return JudgeResult(scores, None, model=IMAGE_MODEL, rubric_version=self.rubric_version, backend=BACKEND, attempts=1)


class HeuristicTextJudge:
    """Text 'judge': share of the task prompt's keywords that the answer mentions, snapped."""

    rubric_version = "heuristic-text-v1"

    def judge_text(
        self,
        sample_id: str,
        task_prompt: str,
        ground_truth: ImageSource,
        gen_prompt: str,
        reference_images: Sequence[Mapping],
    ) -> JudgeResult[TextScore]:
        wanted = keywords(task_prompt)
        answer = " ".join([gen_prompt, *(f"{r.get('title', '')} {r.get('note', '')}" for r in reference_images)])
        found = wanted & keywords(answer)
        recall = len(found) / len(wanted) if wanted else 0.0
        score = snap_to_level(recall) if reference_images else 0.0
        rationale = (
            f"{LABEL}. Sample {sample_id}: {len(found)}/{len(wanted)} prompt keywords in the answer, "
            f"{len(reference_images)} reference(s)."
        )
        return JudgeResult(
            TextScore(score, rationale), None, model=TEXT_MODEL, rubric_version=self.rubric_version, backend=BACKEND, attempts=1
        )
