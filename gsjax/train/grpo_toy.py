"""A toy GRPO environment: one policy call per episode, reward = the share of sampled ids that fall in a
target id range. It exercises the real path (rollout engine, token records, group advantages, RL batches,
sharded learner, weight push) on a tiny model without a tokenizer, tools, generator or judge, so a CPU
test can check that GRPO learns: a random model hits the range at its base rate, and the mean reward
must rise clearly above it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gsjax.agent.engine_policy import TokenRecord, TurnRecord
from gsjax.rewards.dual import EpisodeReward
from gsjax.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams

from .grpo_data import Prompt
from .rollout_phase import Rollout, derive_seed


@dataclass
class ToyEnvironment:
    engine: RolloutEngine
    prompt_ids_range: tuple[int, int]  # prompt ids are drawn from [low, high) (keep clear of special ids)
    target: tuple[int, int]  # rewarded sampled ids: [low, high)
    prompt_len: int = 8
    new_tokens: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0

    def prompt_ids(self, prompt: Prompt) -> tuple[int, ...]:
        rng = np.random.default_rng(derive_seed("toy-prompt", prompt.id))
        return tuple(int(i) for i in rng.integers(*self.prompt_ids_range, size=self.prompt_len))

    def request(self, prompt: Prompt, index: int, step: int) -> GenerationRequest:
        params = SamplingParams(max_tokens=self.new_tokens, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, seed=derive_seed(self.seed, step, prompt.id, index))
        return GenerationRequest(self.prompt_ids(prompt), params, request_id=f"{prompt.id}-{index}")

    async def rollouts(self, prompts: Sequence[Prompt], group_size: int, step: int) -> list[Rollout]:
        pairs = [(p, k) for p in prompts for k in range(group_size)]
        start = time.monotonic()
        results = await self.engine.generate_many([self.request(p, k, step) for p, k in pairs])
        latency = time.monotonic() - start
        out = []
        for (prompt, index), result in zip(pairs, results):
            record = TokenRecord()
            prompt_ids = self.prompt_ids(prompt)
            record.extend(prompt_ids, 0)
            record.extend(result.output_ids, 1, result.logprobs)
            versions = tuple(result.extra.get("weight_versions") or (result.weight_version,))
            record.turns.append(TurnRecord(0, len(prompt_ids), len(result.output_ids), len(result.output_ids),
                                           result.finish_reason, result.weight_version, versions,
                                           result.request_id, round(latency, 6), False, False))
            out.append(Rollout(prompt, index, record, "answer", turns=1))
        return out

    def reward(self, rollout: Rollout) -> EpisodeReward:
        assert rollout.record is not None
        sampled = [t for t, m in zip(rollout.record.input_ids, rollout.record.loss_mask) if m]
        low, high = self.target
        hits = sum(1 for t in sampled if low <= t < high)
        return EpisodeReward(hits / max(len(sampled), 1), "scored", "toy:share_of_target_ids")

    def score(self, rollouts: Sequence[Rollout], step: int) -> None:
        for rollout in rollouts:
            rollout.reward = self.reward(rollout) if rollout.record is not None else None
