"""Chat template rendering (spec/qwen3vl.md §5.3) and chat -> ids/masks (spec §5.5, agent.md §7.2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gsjax.processor import (
    IM_END_ID,
    IM_START_ID,
    IMAGE_PAD_ID,
    ChatEncodingError,
    ImageProcessorConfig,
    encode_chat,
    render_chat,
)
from tests.processor_helpers import random_image


CFG = ImageProcessorConfig()
ASSISTANT_ID, NEWLINE_ID = 77091, 198
TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
)
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Web search for <b>facts</b> & 'quotes' — 天气",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
TRIPLET = "<|vision_start|><|image_pad|><|vision_end|>"
QUERY = "painting 天气"


def text_item(text: str) -> dict:
    return {"type": "text", "text": text}


def test_plain_turns_have_no_default_system_and_a_generation_prompt():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "again"}]}]
    assert render_chat(messages, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages[:1]]
    assert render_chat(with_system) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_tools_block_uses_hf_tojson_semantics():
    tool_json = json.dumps(SEARCH_TOOL, ensure_ascii=False)
    assert "<b>" in tool_json and "天气" in tool_json  # no HTML escaping, no \u escapes, key order kept
    user = {"role": "user", "content": "q"}
    expected_tail = "<|im_start|>user\nq<|im_end|>\n"
    assert render_chat([user], tools=[SEARCH_TOOL]) == (
        "<|im_start|>system\n" + TOOLS_HEAD + "\n" + tool_json + TOOLS_TAIL + expected_tail
    )
    second = {"name": "fetch", "parameters": {"z": 1, "a": 2}}
    system = {"role": "system", "content": [text_item("You are "), text_item("an agent.")]}
    assert render_chat([system, user], tools=[SEARCH_TOOL, second]) == (
        "<|im_start|>system\nYou are an agent.\n\n" + TOOLS_HEAD + "\n" + tool_json
        + '\n{"name": "fetch", "parameters": {"z": 1, "a": 2}}' + TOOLS_TAIL + expected_tail
    )


def test_assistant_tool_calls_render_after_the_content():
    calls = [
        {"type": "function", "function": {"name": "search", "arguments": {"query": "天气 <today>", "n": 2}}},
        {"type": "function", "function": {"name": "browse", "arguments": '{"url": "https://x.org"}'}},
    ]
    user = {"role": "user", "content": "q"}
    rendered = render_chat([user, {"role": "assistant", "content": "", "tool_calls": calls}])
    assert rendered.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "search", "arguments": {"query": "天气 <today>", "n": 2}}\n'
        '</tool_call>\n<tool_call>\n{"name": "browse", "arguments": {"url": "https://x.org"}}\n</tool_call>'
        "<|im_end|>\n"
    )
    rendered = render_chat([user, {"role": "assistant", "content": "Let me look.", "tool_calls": calls[:1]}])
    assert rendered.endswith(
        '<|im_start|>assistant\nLet me look.\n<tool_call>\n{"name": "search", "arguments": '
        '{"query": "天气 <today>", "n": 2}}\n</tool_call><|im_end|>\n'
    )


def test_consecutive_tool_messages_form_one_user_turn():
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "w", "arguments": {}}]},
        {"role": "tool", "content": "18C sunny"},
        {"role": "tool", "content": [{"type": "text", "text": "21C"}, {"type": "image", "image": "x.png"}]},
    ]
    assert render_chat(messages).endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C sunny\n</tool_response>\n<tool_response>\n21C"
        "<|vision_start|><|image_pad|><|vision_end|>\n</tool_response><|im_end|>\n"
    )


def test_vision_items_and_vision_ids():
    content = [{"type": "image", "image": "a.png"}, {"type": "text", "text": "and"},
               {"type": "image_url", "image_url": {"url": "b.png"}}, {"type": "video", "video": "c.mp4"}]
    messages = [{"role": "user", "content": content}]
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    assert render_chat(messages) == f"<|im_start|>user\n{TRIPLET}and{TRIPLET}{video}<|im_end|>\n"
    assert render_chat(messages, add_vision_id=True) == (
        f"<|im_start|>user\nPicture 1: {TRIPLET}andPicture 2: {TRIPLET}Video 1: {video}<|im_end|>\n"
    )


def test_template_refuses_a_late_system_message_and_unknown_roles():
    with pytest.raises(Exception, match="system message is only allowed first"):
        render_chat([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(Exception, match="unknown message role narrator"):
        render_chat([{"role": "narrator", "content": "a"}])


def test_tokenizer_carries_the_template(qwen_tokenizer: Any):
    messages = [{"role": "user", "content": "hi"}]
    assert qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render_chat(
        messages, add_generation_prompt=True
    )


def hf_encode(hf_processor: Any, messages: list, tools: list | None = None, add_generation_prompt: bool = False):
    return hf_processor.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                            add_generation_prompt=add_generation_prompt, return_tensors="np")


def test_spec_check_300x500_matches_the_hf_processor(qwen_tokenizer: Any, hf_processor: Any, tmp_path: Path):
    path = tmp_path / "img.png"
    random_image(300, 500).save(path)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}, text_item("Describe.")]}]
    enc = encode_chat(messages, qwen_tokenizer, CFG, add_generation_prompt=True)
    ref = hf_encode(hf_processor, messages, add_generation_prompt=True)
    assert ref["input_ids"].shape == (1, 156) and enc.input_ids.shape == (156,)
    assert enc.input_ids.dtype == np.int32 and enc.assistant_mask.dtype == np.int8
    assert np.array_equal(enc.input_ids, ref["input_ids"][0])
    assert np.array_equal(enc.mm_token_type_ids, ref["mm_token_type_ids"][0])
    assert int((enc.input_ids == IMAGE_PAD_ID).sum()) == int(enc.mm_token_type_ids.sum()) == 144
    assert enc.pixel_values.shape == (576, 1536) and enc.image_grid_thw.tolist() == [[1, 18, 32]]
    assert np.array_equal(enc.pixel_values, ref["pixel_values"])
    assert enc.assistant_mask.sum() == 0  # only the generation prompt follows the user turn


def agent_episode(image_a: Any, image_b: Any) -> list[dict]:
    return [
        {"role": "system", "content": "You are a search agent."},
        {"role": "user", "content": [text_item("Who painted this?"), {"type": "image", "image": image_a}]},
        {"role": "assistant", "content": "<think>\nI should search.\n</think>\n\n",
         "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": QUERY}}}]},
        {"role": "tool", "content": "1. Monet, Water Lilies"},
        {"role": "tool", "content": [{"type": "text", "text": "Match:"}, {"type": "image", "image": image_b}]},
        {"role": "assistant", "content": "It is Monet."},
    ]


ASSISTANT_BODIES = [
    '<think>\nI should search.\n</think>\n\n\n<tool_call>\n{"name": "search", "arguments": {"query": "' + QUERY
    + '"}}\n</tool_call><|im_end|>',
    "It is Monet.<|im_end|>",
]


def mask_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], mask.astype(np.int64), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_agent_episode_ids_match_hf_and_masks_cover_exactly_the_assistant_turns(qwen_tokenizer: Any, hf_processor: Any):
    messages = agent_episode(random_image(300, 500, seed=1), random_image(120, 90, seed=2))
    enc = encode_chat(messages, qwen_tokenizer, CFG, tools=[SEARCH_TOOL], add_generation_prompt=True)
    ref = hf_encode(hf_processor, messages, tools=[SEARCH_TOOL], add_generation_prompt=True)
    assert np.array_equal(enc.input_ids, ref["input_ids"][0])
    assert np.array_equal(enc.mm_token_type_ids, ref["mm_token_type_ids"][0])
    assert np.array_equal(enc.pixel_values, ref["pixel_values"])
    assert np.array_equal(enc.image_grid_thw, ref["image_grid_thw"])

    ids = enc.input_ids.tolist()
    runs = mask_runs(enc.assistant_mask)
    assert [qwen_tokenizer.decode(ids[a:b]) for a, b in runs] == ASSISTANT_BODIES
    for start, end in runs:
        assert ids[start - 3 : start] == [IM_START_ID, ASSISTANT_ID, NEWLINE_ID]  # header unmasked
        assert ids[end - 1] == IM_END_ID and ids[end] == NEWLINE_ID  # <|im_end|> masked, its "\n" not
    assert ids[-3:] == [IM_START_ID, ASSISTANT_ID, NEWLINE_ID] and enc.assistant_mask[-3:].sum() == 0
    assert not enc.assistant_mask[enc.mm_token_type_ids == 1].any()


def test_image_sources_are_interchangeable(qwen_tokenizer: Any, tmp_path: Path):
    image = random_image(200, 260, seed=9)
    path = tmp_path / "img.png"
    image.save(path)
    item = text_item("Describe.")
    by_pil = encode_chat([{"role": "user", "content": [{"type": "image", "image": image}, item]}], qwen_tokenizer, CFG)
    by_path = encode_chat([{"role": "user", "content": [{"type": "image", "path": path}, item]}], qwen_tokenizer, CFG)
    by_arg = encode_chat([{"role": "user", "content": [{"type": "image"}, item]}], qwen_tokenizer, CFG, images=[image])
    for other in (by_path, by_arg):
        assert np.array_equal(other.input_ids, by_pil.input_ids)
        assert np.array_equal(other.pixel_values, by_pil.pixel_values)


def test_text_only_chat_matches_tokenizer_and_has_no_image_tensors(qwen_tokenizer: Any):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "你好"}]
    enc = encode_chat(messages, qwen_tokenizer, CFG)
    assert enc.pixel_values is None and enc.image_grid_thw is None
    expected = qwen_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert enc.input_ids.tolist() == list(expected)
    assert qwen_tokenizer.decode(enc.input_ids[enc.assistant_mask == 1].tolist()) == "你好<|im_end|>"


@pytest.mark.parametrize(
    ("messages", "kwargs", "match"),
    [
        ([{"role": "assistant", "content": [{"type": "image", "image": "x.png"}]}], {},
         "assistant message cannot carry images"),
        ([{"role": "user", "content": [{"type": "image"}]}], {}, "carry no image"),
        ([{"role": "user", "content": [{"type": "image"}]}], {"images": []}, "0 images for 1 image items"),
        ([{"role": "user", "content": "a <|image_pad|> b"}], {}, "literal <\\|image_pad\\|>"),
        ([{"role": "critic", "content": "a"}], {}, "role 'critic'"),
        ([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}], {}, "video"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "\nanswer"}], {},
         "crosses an assistant span"),
    ],
)
def test_encode_chat_refuses_what_it_cannot_mask_honestly(qwen_tokenizer: Any, messages, kwargs, match):
    with pytest.raises(ChatEncodingError, match=match):
        encode_chat(messages, qwen_tokenizer, CFG, **kwargs)


def test_a_template_that_rewrites_history_is_refused(qwen_tokenizer: Any, monkeypatch):
    rewriting = (
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{%- if loop.last %} (last){% endif %}<|im_end|>\n{% endfor %}"
    )
    monkeypatch.setattr(qwen_tokenizer, "chat_template", rewriting)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "r"}]
    with pytest.raises(ChatEncodingError, match="stable prefix"):
        encode_chat(messages, qwen_tokenizer, CFG)
