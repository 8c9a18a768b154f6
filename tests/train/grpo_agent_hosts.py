"""`python -m tests.train.grpo_agent_hosts CONFIG [key=value ...]`: a GRPO run through the multi-turn agent
path on a scripted engine, for the multi-host test (test_grpo_multihost): the same script in one process or in
each process of a `jax.distributed` job.

The script depends only on the episode id (`<prompt id>-<rollout index>`), never on the weights or the host,
so one process and two processes sample identical episodes. How many image searches an episode makes
rotates with the prompt and the rollout index, so every group holds a different number of images and
the hosts' micro-batches need different vision rows; each search asks for another corpus subject, so the
hosts' images differ and their order in the joined vision input matters. One rollout of every third prompt fails with an
engine error (excluded and counted on the host that ran it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from gsjax.agent.protocol import format_answer, format_tool_call
from gsjax.rollout.engine import EngineError, GenerationRequest
from tests.rollout.fakes import FakeEngine, agent_turn, turn_ids

SUBJECTS = ("Eiffel Tower", "Golden Gate Bridge", "Statue of Liberty", "Sydney Opera House", "Olympic rings",
            "Rubik's Cube", "Stanley Cup", "The Starry Night", "World Cup trophy", "Apollo 11 lunar module")


def query(prompt_id: str, index: int, turn: int) -> str:
    """Another corpus subject per episode and search, so the hosts' rows show different images."""
    return SUBJECTS[(int(prompt_id[-1]) + 3 * index + turn) % len(SUBJECTS)]


def image_searches(prompt_id: str, index: int) -> int:
    """0, 1 or 2 image searches before the answer, rotating with the prompt's trailing digit and the index."""
    return (int(prompt_id[-1]) + index) % 3


def fails(prompt_id: str, index: int) -> bool:
    return int(prompt_id[-1]) % 3 == 0 and index == 3


def scripted_engine(tokenizer: Any) -> FakeEngine:
    def reply(request: GenerationRequest) -> Sequence[int]:
        prompt_id, index, turn = agent_turn(request)
        if fails(prompt_id, index):
            raise EngineError("the rollout server went away")
        searches = image_searches(prompt_id, index)
        if turn < searches:
            arguments = {"query": query(prompt_id, index, turn), "top_k": 1}  # one image per search
            return turn_ids(tokenizer, format_tool_call("image_search", arguments, think="look it up"))
        references = [{"img_id": "IMG_001", "note": "the landmark"}] if searches else []
        return turn_ids(tokenizer, format_answer("The landmark under a pale sky, as in the first reference.",
                                                 references, think="enough"))

    return FakeEngine(reply, version="0")


def main(argv: list[str]) -> None:
    from gsjax.processing.tokenizer import load_tokenizer
    from gsjax.train import grpo
    from gsjax.train.grpo_config import load_grpo_config

    cfg = load_grpo_config(argv[0], argv[1:])
    tokenizer = load_tokenizer(cfg.model.hf_dir)
    grpo.run_grpo(cfg, progress=False, engine_factory=lambda *args: scripted_engine(tokenizer),
                  environment=lambda engine, model_cfg, out: grpo.make_environment(cfg, engine, model_cfg, out,
                                                                                   tokenizer=tokenizer))


if __name__ == "__main__":
    main(sys.argv[1:])
