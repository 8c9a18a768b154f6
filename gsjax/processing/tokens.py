"""Qwen3-VL special tokens: the 26 added tokens, their real ids and special flags (spec/qwen3vl.md §5.2).

The table is the single source for the offline tokenizer build (ids must come out as 151643 + i) and for the
module-level id constants the rest of gsjax uses (masks, stop tokens, M-RoPE image spans).
"""

from __future__ import annotations

from typing import NamedTuple


class AddedTokenSpec(NamedTuple):
    """One added token: its text, its id, and whether decode(skip_special_tokens=True) drops it."""

    content: str
    id: int
    special: bool


FIRST_ADDED_ID = 151643
"""Number of byte-level BPE ranks; the added tokens follow directly."""

_ADDED: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

ADDED_TOKENS: tuple[AddedTokenSpec, ...] = tuple(
    AddedTokenSpec(content, FIRST_ADDED_ID + i, special) for i, (content, special) in enumerate(_ADDED)
)
TOKEN_IDS: dict[str, int] = {t.content: t.id for t in ADDED_TOKENS}

VOCAB_SIZE = FIRST_ADDED_ID + len(ADDED_TOKENS)
"""151,669 tokens the tokenizer knows; the model's embedding is padded further (151,936)."""

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

ENDOFTEXT_ID = TOKEN_IDS[ENDOFTEXT]  # 151643, also the pad token
IM_START_ID = TOKEN_IDS[IM_START]  # 151644
IM_END_ID = TOKEN_IDS[IM_END]  # 151645, the eos token
VISION_START_ID = TOKEN_IDS[VISION_START]  # 151652
VISION_END_ID = TOKEN_IDS[VISION_END]  # 151653
VISION_PAD_ID = TOKEN_IDS["<|vision_pad|>"]  # 151654
IMAGE_PAD_ID = TOKEN_IDS[IMAGE_PAD]  # 151655
VIDEO_PAD_ID = TOKEN_IDS[VIDEO_PAD]  # 151656
TOOL_CALL_START_ID = TOKEN_IDS["<tool_call>"]  # 151657
TOOL_CALL_END_ID = TOKEN_IDS["</tool_call>"]  # 151658
TOOL_RESPONSE_START_ID = TOKEN_IDS["<tool_response>"]  # 151665
TOOL_RESPONSE_END_ID = TOKEN_IDS["</tool_response>"]  # 151666
THINK_START_ID = TOKEN_IDS["<think>"]  # 151667
THINK_END_ID = TOKEN_IDS["</think>"]  # 151668

STOP_TOKEN_IDS: tuple[int, ...] = (IM_END_ID, ENDOFTEXT_ID)
"""Generation ends on either (spec §5.2)."""

MM_TOKEN_TYPE = {IMAGE_PAD_ID: 1, VIDEO_PAD_ID: 2}
"""`mm_token_type_ids` values: 1 at image pads, 2 at video pads, 0 elsewhere."""
