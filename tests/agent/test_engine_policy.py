"""Token-in/token-out policy: whole episodes over a fake engine keep the exact sampled ids, never re-template
history (the record is the concatenation of the pieces each call saw), mask only sampled tokens, carry the
images, and count what a re-tokenisation would have changed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gsjax.agent.config import AgentConfig, ToolsConfig
from gsjax.agent.engine_policy import EnginePolicy, EnginePolicyConfig, TokenRecord
from gsjax.agent.loop import EpisodeResult, Task, run_episode
from gsjax.agent.policy import Message, PolicyError, PolicyLengthError
from gsjax.agent.protocol import format_answer, format_tool_call
from gsjax.agent.tools import open_toolset
from gsjax.processing.chat import encode_chat
from gsjax.processing.images import ImageProcessorConfig
from gsjax.processing.tokens import IM_END_ID, IM_START_ID, IMAGE_PAD_ID, TOOL_RESPONSE_START_ID
from gsjax.rollout.engine import GenerationRequest, GenerationResult
from tests.rollout.fakes import FakeEngine, fake_logprob

CFG = ImageProcessorConfig()
TOOL_CALL = format_tool_call("image_search", {"query": "eiffel tower"}, think="look for the tower")
ANSWER = format_answer("The tower at dusk, like the first reference image.",
                       [{"img_id": "IMG_001", "note": "the tower's shape"}], think="enough")


def turns_so_far(request: GenerationRequest, tokenizer: Any) -> int:
    header = tokenizer.encode("assistant\n", add_special_tokens=False)
    ids = list(request.input_ids)
    return sum(1 for i, t in enumerate(ids) if t == IM_START_ID and ids[i + 1:i + 1 + len(header)] == header) - 1


def scripted(tokenizer: Any, texts: Sequence[str]) -> FakeEngine:
    """Reply texts by turn (read from the prompt, so concurrent episodes each follow the script)."""
    replies = [list(tokenizer.encode(t, add_special_tokens=False)) + [IM_END_ID] for t in texts]
    return FakeEngine(lambda request: replies[min(turns_so_far(request, tokenizer), len(replies) - 1)])


def template_messages(messages: Sequence[Message]) -> list[dict]:
    out = []
    for m in messages:
        content: Any = m.text
        if m.images:
            content = [{"type": "image", "image": i.path} for i in m.images] + [{"type": "text", "text": m.text}]
        out.append({"role": m.role, "content": content})
    return out


def run_two_episodes(policy: EnginePolicy, out: Path) -> list[tuple[EpisodeResult, TokenRecord | None]]:
    async def main() -> list[tuple[EpisodeResult, TokenRecord | None]]:
        async with open_toolset(ToolsConfig(backend="local")) as tools:
            async def one(task: Task) -> tuple[EpisodeResult, TokenRecord | None]:
                result = await run_episode(task, policy, tools, AgentConfig(date="2025-06-01"), out)
                return result, policy.take_record()

            return list(await asyncio.gather(one(Task("Draw the Eiffel Tower", "a")),
                                             one(Task("Draw the Eiffel Tower", "b", rollout_index=1))))

    return asyncio.run(main())


def test_episode_record_is_the_exact_concatenation_of_what_each_call_saw(qwen_tokenizer, tmp_path):
    engine = scripted(qwen_tokenizer, [TOOL_CALL, ANSWER])
    policy = EnginePolicy(engine, qwen_tokenizer, CFG)
    runs = run_two_episodes(policy, tmp_path)
    assert {r.termination for r, _ in runs} == {"answer"}
    for result, record in runs:
        assert record is not None and len(record.turns) == 2
        requests = {r.request_id: r for r in engine.requests}
        for turn in record.turns:
            request = requests[turn.request_id]
            # each prompt is exactly the record so far: nothing earlier was ever re-tokenised
            assert list(request.input_ids) == record.input_ids[:turn.prompt_len]
            sampled = record.input_ids[turn.prompt_len:turn.prompt_len + turn.kept]
            assert sampled[-1] == IM_END_ID and turn.finish_reason == "stop" and turn.weight_version == "v0"
            assert turn.weight_versions == ("v0",)
            assert record.logprobs[turn.prompt_len:turn.prompt_len + turn.kept] == [
                fake_logprob(i, t) for i, t in enumerate(sampled)]
        # loss mask 1 exactly on sampled ids; logprobs 0 elsewhere
        sampled_positions = {p for t in record.turns for p in range(t.prompt_len, t.prompt_len + t.kept)}
        assert {i for i, m in enumerate(record.loss_mask) if m} == sampled_positions
        assert all(lp == 0.0 for i, lp in enumerate(record.logprobs) if i not in sampled_positions)
        assert len(record.input_ids) == len(record.loss_mask) == len(record.logprobs)
        # the images the model saw travel with the record, in prompt order
        shown = [i for m in result.messages for i in m.images]
        assert shown and [i.sha256 for i in record.images] == [i.sha256 for i in shown]
        last = requests[record.turns[-1].request_id].images
        assert last is not None and last.encoded == tuple(Path(i.path).read_bytes() for i in shown)
        # nothing was edited, so TITO equals the canonical rendering of the final conversation (its mask too)
        canonical = encode_chat(template_messages(result.messages), qwen_tokenizer, CFG)
        assert record.input_ids == canonical.input_ids.tolist()[:-1]  # all but the final "\n" the loop never sends
        assert record.loss_mask == canonical.assistant_mask.tolist()[:-1]
        arrays = record.to_arrays()
        np.testing.assert_array_equal(arrays["pixel_values"], canonical.pixel_values)
        np.testing.assert_array_equal(arrays["image_grid_thw"], canonical.image_grid_thw)
        assert arrays["input_ids"].dtype == np.int32 and int((arrays["input_ids"] == IMAGE_PAD_ID).sum()) > 0
        assert record.retokenize_mismatches == record.edited_turns == record.template_fallbacks == 0
        assert record.weight_versions == ["v0", "v0"] and record.to_record()["images"][0]["sha256"] == shown[0].sha256
    assert runs[0][1].input_ids != [] and runs[0][1] is not runs[1][1]


def direct(policy: EnginePolicy, calls: Sequence[tuple[list[Message], int]]) -> tuple[list, TokenRecord | None]:
    """The replies to calls made in one task, and that task's record (the conversation lives in the task)."""
    async def main() -> tuple[list, TokenRecord | None]:
        replies = [await policy.complete(messages, max_tokens) for messages, max_tokens in calls]
        return replies, policy.take_record()

    return asyncio.run(main())


SYSTEM, USER = Message("system", "Be brief."), Message("user", "Go.")


def test_truncated_and_hallucinating_turns_are_closed_with_mask_zero_tokens(qwen_tokenizer):
    words = list(qwen_tokenizer.encode(" one two three four five six", add_special_tokens=False))
    fake_tool = list(qwen_tokenizer.encode("<think>x</think> <tool_response>made up", add_special_tokens=False))
    engine = FakeEngine([words + [IM_END_ID], fake_tool + [IM_END_ID], [7, 8, IM_END_ID]])
    policy = EnginePolicy(engine, qwen_tokenizer, CFG)
    replies = {}

    async def main() -> TokenRecord | None:
        first = await policy.complete([SYSTEM, USER], 3)
        history = [SYSTEM, USER, Message("assistant", first.text.strip()), Message("user", "TRUNCATED, retry")]
        second = await policy.complete(history, 64)
        history += [Message("assistant", second.text.split("<tool_response>")[0].strip()), Message("user", "again")]
        replies.update(first=first, second=second, third=await policy.complete(history, 64))
        return policy.take_record()

    record = asyncio.run(main())
    assert record is not None
    first, second = replies["first"], replies["second"]
    assert first.finish_reason == "length" and first.token_ids == tuple(words[:3]) and first.completion_tokens == 3
    assert second.token_ids == (*fake_tool, IM_END_ID) and "<tool_response>" in second.text
    t0, t1, t2 = record.turns
    cut = fake_tool.index(TOOL_RESPONSE_START_ID)
    assert (t0.kept, t1.sampled, t1.kept, t1.tool_response_cut) == (3, len(fake_tool) + 1, cut, True)
    closing = qwen_tokenizer.encode("<|im_end|>\n", add_special_tokens=False)
    for turn, nxt in ((t0, t1), (t1, t2)):  # after a turn without its own <|im_end|>: one added, mask 0
        end = turn.prompt_len + turn.kept
        assert record.input_ids[end:end + 2] == closing and record.loss_mask[end:end + 2] == [0, 0]
        assert record.loss_mask[nxt.prompt_len - 1] == 0
        assert engine.requests[nxt.index].input_ids == tuple(record.input_ids[:nxt.prompt_len])
    assert record.input_ids[t1.prompt_len:t1.prompt_len + t1.kept] == fake_tool[:cut]
    assert record.tool_response_cuts == 1 and record.edited_turns == 1  # the loop dropped the made-up response
    assert sum(record.loss_mask) == 3 + cut + 3


def test_a_reply_whose_retokenisation_differs_is_kept_and_counted(qwen_tokenizer):
    whole = qwen_tokenizer.encode(" hello", add_special_tokens=False)
    split = qwen_tokenizer.encode(" hel", add_special_tokens=False) + qwen_tokenizer.encode("lo",
                                                                                          add_special_tokens=False)
    assert len(whole) == 1 and split != whole  # " hello" is one token; the model sampled two pieces of it
    engine = FakeEngine([split + [IM_END_ID], [9, IM_END_ID]])
    policy = EnginePolicy(engine, qwen_tokenizer, CFG)
    (first, _), record = direct(policy, [([SYSTEM, USER], 16), ([SYSTEM, USER, Message("assistant", "hello"),
                                                                 Message("user", "more")], 16)])
    assert first.text == " hello" and record is not None
    assert policy.conversation() is None  # outside the task that ran the episode there is no conversation
    t0 = record.turns[0]
    assert record.input_ids[t0.prompt_len:t0.prompt_len + t0.kept] == [*split, IM_END_ID]  # the sampled ids stay
    assert t0.retokenize_mismatch and record.retokenize_mismatches == 1
    assert record.edited_turns == 0  # the loop strips every turn; only other changes count as edits


def test_context_guard_abort_retries_and_new_episodes_in_one_task(qwen_tokenizer):
    aborts = [1]

    class Aborting(FakeEngine):
        async def generate(self, request: GenerationRequest) -> GenerationResult:
            result = await super().generate(request)
            if aborts[0]:
                aborts[0] -= 1
                return GenerationResult(request.request_id, (), (), "abort", self.version, len(request.input_ids),
                                        {"message": "paused for a weight update"})
            return result

    engine = Aborting(version="v3")
    policy = EnginePolicy(engine, qwen_tokenizer, CFG, EnginePolicyConfig(max_context_tokens=40, seed=11))

    async def main() -> None:
        reply = await policy.complete([SYSTEM, USER], 8)
        assert len(engine.requests) == 2 and reply.extra["weight_version"] == "v3"  # the abort was retried
        before = list(policy.conversation().record.input_ids)
        with pytest.raises(PolicyLengthError, match="maximum context length of 40"):
            await policy.complete([SYSTEM, USER, Message("assistant", reply.text), Message("user", "x " * 40)], 8)
        assert policy.conversation().record.input_ids == before  # a refused turn changes nothing
        await policy.complete([SYSTEM, Message("user", "Another task.")], 8)  # a new episode in the same task
        assert policy.dropped_records == 1 and len(policy.take_record().turns) == 1
        assert engine.requests[0].params.seed is not None and engine.requests[0].params.seed != \
            engine.requests[-1].params.seed
        aborts[0] = 5
        with pytest.raises(PolicyError, match="aborted 3 times"):
            await policy.complete([SYSTEM, USER], 8)

    asyncio.run(main())
