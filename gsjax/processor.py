"""Public API for Qwen3-VL input processing: images -> pixel patches + grids, the offline tokenizer, the chat
template, and chat -> token ids with assistant loss masks (spec/qwen3vl.md §5, spec/agent.md §7.2).

The work lives in `gsjax.processing.*` (images, tokens, tokenizer, template, chat, hf_reference); this module
re-exports what the rest of gsjax calls.
"""

from gsjax.processing.chat import ChatEncoding, ChatEncodingError, assistant_spans, encode_chat
from gsjax.processing.hf_reference import build_hf_processor
from gsjax.processing.images import (
    ImageInput,
    ImageProcessorConfig,
    image_grid,
    load_image_file,
    num_image_tokens,
    process_image,
    process_images,
    smart_resize,
    to_rgb_array,
)
from gsjax.processing.template import chat_template, render_chat
from gsjax.processing.tokenizer import check_added_tokens, load_tokenizer, offline_tokenizer_dir
from gsjax.processing.tokens import (
    ADDED_TOKENS,
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    IMAGE_PAD_ID,
    STOP_TOKEN_IDS,
    THINK_END_ID,
    THINK_START_ID,
    TOKEN_IDS,
    TOOL_CALL_END_ID,
    TOOL_CALL_START_ID,
    TOOL_RESPONSE_END_ID,
    TOOL_RESPONSE_START_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_PAD_ID,
    VISION_START_ID,
    VOCAB_SIZE,
)

__all__ = [
    "ADDED_TOKENS",
    "ENDOFTEXT_ID",
    "IM_END_ID",
    "IM_START_ID",
    "IMAGE_PAD_ID",
    "STOP_TOKEN_IDS",
    "THINK_END_ID",
    "THINK_START_ID",
    "TOKEN_IDS",
    "TOOL_CALL_END_ID",
    "TOOL_CALL_START_ID",
    "TOOL_RESPONSE_END_ID",
    "TOOL_RESPONSE_START_ID",
    "VIDEO_PAD_ID",
    "VISION_END_ID",
    "VISION_PAD_ID",
    "VISION_START_ID",
    "VOCAB_SIZE",
    "ChatEncoding",
    "ChatEncodingError",
    "ImageInput",
    "ImageProcessorConfig",
    "assistant_spans",
    "build_hf_processor",
    "chat_template",
    "check_added_tokens",
    "encode_chat",
    "image_grid",
    "load_image_file",
    "load_tokenizer",
    "num_image_tokens",
    "offline_tokenizer_dir",
    "process_image",
    "process_images",
    "render_chat",
    "smart_resize",
    "to_rgb_array",
]
