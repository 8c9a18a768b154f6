"""The episode reward: gate -> generate -> image judge and/or text judge -> R.

R = max(0, (1 - c) S_img + c S_txt) (spec training_and_eval.md §2.2, §2.5), with image-only
and text-only modes for the ablation. A component the formula needs but could not get makes
the reward *missing* (None), never 0 (agent.md §8 item 8): GRPO then leaves the rollout out of
its group statistics instead of learning from an infrastructure accident.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gsjax.rewards.gate import GateOutcome, check_gate
from gsjax.rewards.image_judge import ImageJudgeBackend
from gsjax.rewards.judge_client import JudgeResult, backoff_delay
from gsjax.rewards.text_judge import TextJudgeBackend

RewardMode = Literal["dual", "image", "text"]


class ImageGenerator(Protocol):
    """The narrow generator interface the reward and KnowGen need (agent.md §6.1 behind it)."""

    def generate(self, prompt: str, images: Sequence[bytes]) -> bytes:
        """Return the encoded image for `prompt` conditioned on `images`; raise on failure."""


def clamp_coef(c: float) -> float:
    return min(1.0, max(0.0, float(c)))


def needed_components(mode: RewardMode, c: float) -> tuple[bool, bool]:
    """(needs S_img, needs S_txt): a component with weight 0 is not needed."""
    if mode == "image":
        return True, False
    if mode == "text":
        return False, True
    c = clamp_coef(c)
    return c < 1.0, c > 0.0


def combine(s_img: float | None, s_txt: float | None, *, mode: RewardMode = "dual", c: float = 0.5) -> float | None:
    """R for the mode; None when a needed component is missing."""
    need_img, need_txt = needed_components(mode, c)
    if (need_img and s_img is None) or (need_txt and s_txt is None):
        return None
    if mode == "image":
        return max(0.0, s_img)
    if mode == "text":
        return max(0.0, s_txt)
    c = clamp_coef(c)
    total = (1.0 - c) * s_img if need_img else 0.0
    if need_txt:
        total += c * s_txt
    return max(0.0, total)


def generate_with_retries(
    generator: ImageGenerator,
    prompt: str,
    images: Sequence[bytes],
    *,
    attempts: int,
    backoff_base_s: float,
    backoff_cap_s: float,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> tuple[bytes | None, str]:
    """Bounded retries with backoff; returns (image, "") or (None, the last error)."""
    rng = rng or random.Random()
    error = "no attempt made"
    for attempt in range(1, attempts + 1):
        try:
            image = generator.generate(prompt, images)
            if image:
                return image, ""
            error = "empty image"
        except Exception as exc:  # any generator failure is retried, then reported
            error = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            sleep(backoff_delay(attempt, backoff_base_s, backoff_cap_s, rng))
    return None, error


@dataclass(frozen=True)
class RewardConfig:
    """`text_coef` is c (GEN_REWARD_TEXT_COEF, 0.5 in training); the rest bound the pipeline."""

    mode: RewardMode = "dual"
    text_coef: float = 0.5
    min_references: int = 1
    max_references: int = 3
    generator_max_images: int = 3
    generation_attempts: int = 3
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 10.0


@dataclass(frozen=True)
class EpisodeReward:
    """Outcome of one episode: `reward` is None exactly when `status` is "missing"."""

    reward: float | None
    status: GateOutcome | Literal["scored"]
    reason: str
    image_reward: float | None = None
    text_reward: float | None = None
    image_judgement: JudgeResult | None = None
    text_judgement: JudgeResult | None = None
    generated_image: bytes | None = field(default=None, repr=False)

    def as_record(self) -> dict[str, object]:
        """Loggable fields (no image bytes)."""
        record: dict[str, object] = {
            "reward": self.reward,
            "status": self.status,
            "reason": self.reason,
            "image_reward": self.image_reward,
            "text_reward": self.text_reward,
        }
        for name, judged in (("image_judge", self.image_judgement), ("text_judge", self.text_judgement)):
            if judged is not None:
                record[name] = {**judged.provenance(), "error": judged.failure.describe() if judged.failure else None}
        return record


@dataclass
class EpisodeRewarder:
    """Scores finished episodes. Judges are optional only when the mode does not need them."""

    config: RewardConfig
    generator: ImageGenerator | None
    image_judge: ImageJudgeBackend | None
    text_judge: TextJudgeBackend | None
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def __call__(
        self,
        *,
        sample_id: str,
        question: str,
        gt_image: str | None,
        prediction: object,
        termination: str | None = None,
    ) -> EpisodeReward:
        cfg = self.config
        need_img, need_txt = needed_components(cfg.mode, cfg.text_coef)
        configured = (not need_img or (self.image_judge is not None and self.generator is not None)) and (
            not need_txt or self.text_judge is not None
        )
        verdict = check_gate(
            question=question,
            gt_image=gt_image,
            prediction=prediction,
            termination=termination,
            min_references=cfg.min_references,
            max_references=cfg.max_references,
            judge_configured=configured,
        )
        if verdict.outcome == "zero":
            return EpisodeReward(0.0, "zero", verdict.reason)
        if verdict.outcome == "missing":
            return EpisodeReward(None, "missing", verdict.reason)
        assert isinstance(prediction, Mapping) and gt_image is not None  # the gate checked both
        gen_prompt = str(prediction["gen_prompt"])
        s_img = s_txt = None
        image_judged = text_judged = None
        image: bytes | None = None
        if need_img:
            refs = [p.read_bytes() for p in verdict.references[: cfg.generator_max_images]]
            image, error = generate_with_retries(
                self.generator, gen_prompt, refs, attempts=cfg.generation_attempts,
                backoff_base_s=cfg.backoff_base_s, backoff_cap_s=cfg.backoff_cap_s, sleep=self.sleep, rng=self.rng,
            )
            if image is None:
                return EpisodeReward(None, "missing", f"generation_failed:{error}")
            image_judged = self.image_judge.judge_image(sample_id, question, image, gt_image)
            s_img = image_judged.value.overall if image_judged.ok else None
        if need_txt:
            refs_meta = [r for r in prediction.get("reference_images") or [] if isinstance(r, Mapping)]
            text_judged = self.text_judge.judge_text(sample_id, question, gt_image, gen_prompt, refs_meta)
            s_txt = text_judged.value.score if text_judged.ok else None
        reward = combine(s_img, s_txt, mode=cfg.mode, c=cfg.text_coef)
        failed = [j.failure.describe() for j in (image_judged, text_judged) if j is not None and not j.ok]
        status, reason = ("scored", "ok") if reward is not None else ("missing", "judge_failed:" + "; ".join(failed))
        return EpisodeReward(reward, status, reason, s_img, s_txt, image_judged, text_judged, image)

