"""The rollout phase of a GRPO step: n episodes per prompt on the rollout engine, token-in/token-out, each
kept as its exact `TokenRecord` with its outcome (termination, prediction, tool calls, weight versions).

Environments share one contract: `await env.rollouts(prompts, group_size, step)` returns one `Rollout`
per (prompt, rollout index), in prompt-major order. Sampling seeds derive from (run seed, step, prompt
id, rollout index, turn), so a resumed step samples what the interrupted one would have, whatever the
order in which concurrent episodes reach the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gsjax.agent.config import AgentConfig, ToolsConfig
from gsjax.agent.engine_policy import EnginePolicy, EnginePolicyConfig, TokenRecord
from gsjax.agent.loop import EpisodeResult, Task, run_episode
from gsjax.agent.tools import open_toolset
from gsjax.processing.images import ImageProcessorConfig
from gsjax.rewards.dual import EpisodeReward
from gsjax.rollout.engine import RolloutEngine

from .advantages import MISSING_REWARD, reason_of
from .grpo_data import Prompt

NO_RECORD = "no_token_record"  # the episode never got a policy reply: nothing to train on


@dataclass
class Rollout:
    """One episode as the trainer sees it; `reward` is filled by the reward phase."""

    prompt: Prompt
    index: int  # rollout index within its group
    record: TokenRecord | None
    termination: str
    prediction: dict[str, Any] = field(default_factory=dict)
    tool_calls: int = 0
    turns: int = 0
    directory: str = ""
    reward: EpisodeReward | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def group_id(self) -> str:
        return self.prompt.id

    @property
    def episode_id(self) -> str:
        return f"{self.prompt.id}:{self.index}"

    @property
    def reward_value(self) -> float | None:
        return None if self.reward is None else self.reward.reward

    @property
    def failure(self) -> str | None:
        """Why the episode is excluded from statistics and loss (tool / generator / judge failure), or None."""
        reason = None if self.reward is None else reason_of(self.reward.status, self.reward.reason)
        if reason:
            return reason
        if self.record is None or not self.record.turns:
            return NO_RECORD
        return MISSING_REWARD if self.reward_value is None else None

    @property
    def weight_versions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v for t in (self.record.turns if self.record else []) for v in t.weight_versions))

    def summary(self) -> dict[str, Any]:
        """A JSON line for the step's rollout log (no token ids, no pixels)."""
        record = self.record
        return {"episode_id": self.episode_id, "group_id": self.group_id, "termination": self.termination,
                "failure": self.failure, "has_record": record is not None,
                "reward": None if self.reward is None else self.reward.as_record(),
                "tool_calls": self.tool_calls, "turns": self.turns, "tokens": len(record) if record else 0,
                "sampled_tokens": int(sum(record.loss_mask)) if record else 0,
                "images": len(record.images) if record else 0, "weight_versions": list(self.weight_versions),
                "directory": self.directory, **self.extra}


class Environment(Protocol):
    """Runs a step's episodes on the engine (rollout phase) and scores them (reward phase)."""

    async def rollouts(self, prompts: Sequence[Prompt], group_size: int, step: int) -> list[Rollout]: ...

    def score(self, rollouts: Sequence[Rollout], step: int) -> None:
        """Set `rollout.reward` on each rollout."""


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class AgentEnvironment:
    """The Gen-Searcher agent (spec agent.md) over a rollout engine, with its tools; `rewarder` scores
    finished episodes (gsjax.train.grpo_rewards)."""

    engine: RolloutEngine
    tokenizer: Any
    agent_cfg: AgentConfig
    tools_cfg: ToolsConfig
    image_cfg: ImageProcessorConfig
    policy_cfg: EnginePolicyConfig
    out_dir: Path
    rewarder: Any  # (Rollout) -> EpisodeReward; see grpo_rewards.RolloutRewarder
    concurrency: int = 64
    seed: int = 0
    keep_episode_dirs: bool = True  # False: each step's episode folders (result.json, images) go after scoring

    def step_dir(self, step: int) -> Path:
        return Path(self.out_dir) / f"step{step:06d}"

    async def rollouts(self, prompts: Sequence[Prompt], group_size: int, step: int) -> list[Rollout]:
        cfg = dataclasses.replace(self.policy_cfg, seed=derive_seed(self.seed, step))
        policy = EnginePolicy(self.engine, self.tokenizer, self.image_cfg, cfg, name=f"s{step}-")
        limit = asyncio.Semaphore(self.concurrency)
        out_dir = self.step_dir(step)

        async def one(prompt: Prompt, index: int) -> Rollout:
            async with limit:
                # one conversation per task, named by the episode: its seeds do not depend on start order
                policy.new_conversation().id = f"{prompt.id}-{index}"
                task = Task(prompt.question, prompt.id, index, meta={"gt_image": prompt.gt_image, "step": step})
                result = await run_episode(task, policy, tools, self.agent_cfg, out_dir)
                return episode_rollout(prompt, index, result, policy.take_record())

        async with open_toolset(self.tools_cfg) as tools:
            return list(await asyncio.gather(*(one(p, k) for p in prompts for k in range(group_size))))

    def score(self, rollouts: Sequence[Rollout], step: int) -> None:
        self.rewarder.score_all(rollouts)
        if not self.keep_episode_dirs:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)


def episode_rollout(prompt: Prompt, index: int, result: EpisodeResult, record: TokenRecord | None) -> Rollout:
    return Rollout(prompt, index, record, result.termination, dict(result.prediction), len(result.tool_calls),
                   result.rounds, result.directory,
                   extra={"protocol_errors": len(result.protocol_errors),
                          "retokenize_mismatches": record.retokenize_mismatches if record else 0})


def run_rollouts(env: Environment, prompts: Sequence[Prompt], group_size: int, step: int,
                 loop: asyncio.AbstractEventLoop | None = None) -> list[Rollout]:
    """The rollout phase as a blocking call. Pass the run's one event loop: engine clients that keep
    per-loop connections (SGLang) then reuse them across steps instead of opening new ones each step."""
    if loop is None:
        return asyncio.run(env.rollouts(prompts, group_size, step))
    return loop.run_until_complete(env.rollouts(prompts, group_size, step))
