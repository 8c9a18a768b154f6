"""Rewards: the reward gate, the image and text judges (OpenAI-compatible or heuristic) and the
dual combination R = max(0, (1 - c) S_img + c S_txt). Spec training_and_eval.md §2."""

from gsjax.rewards.dual import EpisodeReward, EpisodeRewarder, ImageGenerator, RewardConfig, combine
from gsjax.rewards.gate import GateVerdict, check_gate
from gsjax.rewards.image_judge import ImageJudge, ImageJudgeBackend, ImageScores
from gsjax.rewards.judge_client import JudgeClient, JudgeConfig, JudgeFailure, JudgeResult
from gsjax.rewards.text_judge import TextJudge, TextJudgeBackend, TextScore

__all__ = [
    "EpisodeReward",
    "EpisodeRewarder",
    "GateVerdict",
    "ImageGenerator",
    "ImageJudge",
    "ImageJudgeBackend",
    "ImageScores",
    "JudgeClient",
    "JudgeConfig",
    "JudgeFailure",
    "JudgeResult",
    "RewardConfig",
    "TextJudge",
    "TextJudgeBackend",
    "TextScore",
    "check_gate",
    "combine",
]
