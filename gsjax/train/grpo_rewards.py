"""The reward phase of a GRPO step: each finished episode -> gate -> image generation -> judges -> R
(gsjax.rewards.dual), many episodes at a time on worker threads.

Built from the run config: judges over an OpenAI-compatible API (key from an environment variable) or
the OFFLINE heuristic backend; generators over the image server / OpenAI images API, or the OFFLINE
`reference` stand-in that returns the first reference image (CPU recipe and tests; every result it
feeds is labelled by the heuristic judge as not comparable to model-judge scores).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gsjax.rewards.dual import EpisodeReward, EpisodeRewarder, ImageGenerator, RewardConfig
from gsjax.rewards.heuristic import HeuristicImageJudge, HeuristicTextJudge
from gsjax.rewards.image_judge import ImageJudge
from gsjax.rewards.judge_client import JudgeClient, JudgeConfig
from gsjax.rewards.text_judge import TextJudge

from .grpo_config import RewardSection
from .rollout_phase import Rollout

log = logging.getLogger(__name__)


class ReferenceImageGenerator:
    """OFFLINE stand-in generator: the 'generated' image is the first reference image, unchanged."""

    def generate(self, prompt: str, images: Sequence[bytes]) -> bytes:
        if not images:
            raise ValueError("the reference stand-in generator needs at least one reference image")
        return images[0]


def make_generator(section: RewardSection) -> ImageGenerator:
    if section.generator == "reference":
        return ReferenceImageGenerator()
    from gsjax.imagegen.client import ImageGenConfig, make_image_generator

    return make_image_generator(ImageGenConfig(backend=section.generator, urls=section.generator_urls,
                                               model=section.generator_model,
                                               api_key_env=section.generator_api_key_env))


def make_episode_rewarder(section: RewardSection, max_references: int) -> EpisodeRewarder:
    """The dual-reward pipeline of the config (judges the mode does not need are still built: cheap)."""
    config = RewardConfig(mode=section.mode, text_coef=section.text_coef, min_references=section.min_references,
                          max_references=max_references, generation_attempts=section.generation_attempts)
    if section.judge == "heuristic":
        log.warning("reward.judge=heuristic: OFFLINE heuristic scores, not a judge model")
        return EpisodeRewarder(config, make_generator(section), HeuristicImageJudge(), HeuristicTextJudge())
    client = JudgeClient(JudgeConfig(base_url=section.judge_base_url, model=section.judge_model,
                                     api_key=os.environ.get(section.judge_api_key_env, ""),
                                     max_attempts=section.judge_max_attempts))
    return EpisodeRewarder(config, make_generator(section), ImageJudge(client), TextJudge(client))


@dataclass
class RolloutRewarder:
    """Scores rollouts with an EpisodeRewarder on `workers` threads (judge and generator calls block)."""

    rewarder: EpisodeRewarder
    workers: int = 32

    def score(self, rollout: Rollout) -> EpisodeReward:
        try:
            return self.rewarder(sample_id=rollout.episode_id, question=rollout.prompt.question,
                                 gt_image=rollout.prompt.gt_image, prediction=rollout.prediction,
                                 termination=rollout.termination)
        except Exception as exc:  # a reward bug costs one episode (missing, counted), not the run
            log.exception("reward of %s failed", rollout.episode_id)
            return EpisodeReward(None, "missing", f"reward_error:{type(exc).__name__}: {exc}")

    def score_all(self, rollouts: Sequence[Rollout]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(rollouts)))) as pool:
            for rollout, reward in zip(rollouts, pool.map(self.score, rollouts)):
                rollout.reward = reward
