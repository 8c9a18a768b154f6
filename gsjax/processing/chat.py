"""Chat messages -> token ids, assistant loss mask, `mm_token_type_ids` and image tensors.

Mask rule (spec/agent.md §7.2): 1 on every token an assistant message contributes after its
`<|im_start|>assistant\\n` header, through and including its closing `<|im_end|>`: the content, any
`<think>…</think>` text and `<tool_call>` blocks. 0 on the header, on the `\\n` after `<|im_end|>`, on
system/user/tool turns (tool responses included), on the tools block and on the generation prompt.

How the mask stays honest: the conversation is rendered once; each assistant message's character span is
found by rendering the prefixes before and after it and checking both are prefixes of the full render (a
template that re-renders history differently is refused). The text is cut at span edges, placeholders are
expanded to grid-derived `<|image_pad|>` counts, each piece is tokenised alone, and the concatenation must
equal tokenising the whole string, so no token straddles a mask edge. Any violation raises `ChatEncodingError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gsjax.processing.images import ImageInput, ImageProcessorConfig, process_images
from gsjax.processing.template import chat_template, render_chat
from gsjax.processing.tokens import IM_END, IM_START, IMAGE_PAD, IMAGE_PAD_ID, VIDEO_PAD, VIDEO_PAD_ID

ROLES = ("system", "user", "assistant", "tool")
MEDIA_ROLES = ("user", "tool")
ASSISTANT_HEADER = f"{IM_START}assistant\n"
ASSISTANT_FOOTER = f"{IM_END}\n"
_PAYLOAD_KEYS = ("image", "path", "url", "image_url")


class ChatEncodingError(ValueError):
    """The conversation cannot be encoded with trustworthy masks (bad message, template or tokenisation)."""


@dataclass(frozen=True, eq=False)
class ChatEncoding:
    """One encoded conversation. Arrays are 1-D over tokens; image tensors are None without images."""

    input_ids: np.ndarray  # (L,) int32
    assistant_mask: np.ndarray  # (L,) int8, the rule in the module docstring
    mm_token_type_ids: np.ndarray  # (L,) int32: 1 image pad, 2 video pad, 0 otherwise
    pixel_values: np.ndarray | None  # (N, 3*T*P*P) float32
    image_grid_thw: np.ndarray | None  # (n, 3) int64
    text: str  # the rendered conversation before placeholder expansion

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def is_image_item(item: Mapping[str, Any]) -> bool:
    """The template's own test for an image content item."""
    return item.get("type") == "image" or "image" in item or "image_url" in item


def is_video_item(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "video" or "video" in item


def image_payload(item: Mapping[str, Any]) -> Any:
    """The image an item carries (`image`, `path`, `url` or OpenAI `image_url` / `{"url": …}`), or None."""
    for key in _PAYLOAD_KEYS:
        value = item.get(key)
        if isinstance(value, Mapping):
            value = value.get("url")
        if value is not None:
            return value
    return None


def _content_items(message: Mapping[str, Any], index: int) -> list[Mapping[str, Any]]:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return []
    if not isinstance(content, Sequence):
        raise ChatEncodingError(f"message {index}: content must be a string or a list, got {type(content).__name__}")
    for item in content:
        if not isinstance(item, Mapping):
            raise ChatEncodingError(f"message {index}: content items must be dicts, got {type(item).__name__}")
    return list(content)


def collect_image_items(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Validate roles and media placement; return each image item's payload (or None) in render order."""
    payloads = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ChatEncodingError(f"message {index}: role {role!r} is not one of {ROLES}")
        if role == "system" and index != 0:
            raise ChatEncodingError(f"message {index}: a system message is only allowed first")
        for item in _content_items(message, index):
            if is_video_item(item) and not is_image_item(item):
                raise ChatEncodingError(f"message {index}: video content is not supported")
            if is_image_item(item):
                if role not in MEDIA_ROLES:
                    raise ChatEncodingError(
                        f"message {index}: a {role} message cannot carry images (the template drops them)"
                    )
                payloads.append(image_payload(item))
    return payloads


def _resolve_images(messages: Sequence[Mapping[str, Any]], images: Sequence[ImageInput] | None) -> list[Any]:
    payloads = collect_image_items(messages)
    if images is not None:
        if len(images) != len(payloads):
            raise ChatEncodingError(f"got {len(images)} images for {len(payloads)} image items in the messages")
        return list(images)
    missing = [i for i, p in enumerate(payloads) if p is None]
    if missing:
        raise ChatEncodingError(f"image items {missing} carry no image; pass images= or set their 'image' key")
    return payloads


def assistant_spans(
    messages: Sequence[Mapping[str, Any]], text: str, render: Callable[[Sequence[Any]], str]
) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant message's masked part (after the header, through
    `<|im_end|>`) in `text`, located by rendering the message prefixes around it."""
    spans = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(messages[:index]) if index else ""
        after = render(messages[: index + 1])
        if not (text.startswith(before) and text.startswith(after)):
            raise ChatEncodingError(
                f"message {index}: the chat template does not render history as a stable prefix; "
                "assistant masks cannot be located"
            )
        turn = after[len(before) :]
        if not (turn.startswith(ASSISTANT_HEADER) and turn.endswith(ASSISTANT_FOOTER)):
            raise ChatEncodingError(
                f"message {index}: assistant turn renders as {turn[:40]!r}…{turn[-20:]!r}, "
                f"expected {ASSISTANT_HEADER!r}…{ASSISTANT_FOOTER!r}"
            )
        spans.append((len(before) + len(ASSISTANT_HEADER), len(after) - 1))
    return spans


def _segments(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[str, int]]:
    """`text` cut into (piece, mask) runs at the span edges; empty pieces dropped."""
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [(text[cursor:start], 0), (text[start:end], 1)]
        cursor = end
    pieces.append((text[cursor:], 0))
    return [(piece, mask) for piece, mask in pieces if piece]


def _expand_image_pads(pieces: Sequence[tuple[str, int]], counts: Sequence[int]) -> list[tuple[str, int]]:
    """Replace the k-th `<|image_pad|>` (across pieces, in order) with counts[k] copies."""
    queue = iter(counts)
    expanded = []
    for piece, mask in pieces:
        parts = piece.split(IMAGE_PAD)
        rebuilt = parts[0] + "".join(IMAGE_PAD * next(queue) + part for part in parts[1:])
        expanded.append((rebuilt, mask))
    return expanded


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_chat(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    cfg: ImageProcessorConfig,
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = False,
    images: Sequence[ImageInput] | None = None,
) -> ChatEncoding:
    """Encode an OpenAI/HF-style conversation for the Qwen3-VL policy.

    Images come from the messages' image items (`image`/`path`/`url`/`image_url`), or from `images` (one per
    image item, in order, overriding the items' payloads). The tokenizer's own chat template is used when it
    has one, else gsjax's. Token ids equal the HF Qwen3-VL processor's for the same conversation."""
    payloads = _resolve_images(messages, images)
    template = getattr(tokenizer, "chat_template", None) or chat_template()
    special_tokens = dict(getattr(tokenizer, "special_tokens_map", {}) or {})

    def render(prefix: Sequence[Any], generation_prompt: bool = False) -> str:
        return render_chat(
            prefix, tools=tools, add_generation_prompt=generation_prompt, template=template, **special_tokens
        )

    text = render(messages, add_generation_prompt)
    if VIDEO_PAD in text:
        raise ChatEncodingError("the rendered chat contains video placeholders; video is not supported")
    if text.count(IMAGE_PAD) != len(payloads):
        raise ChatEncodingError(
            f"the rendered chat has {text.count(IMAGE_PAD)} image placeholders for {len(payloads)} images "
            "(is there a literal <|image_pad|> in some text?)"
        )
    pixel_values, grid = process_images(payloads, cfg) if payloads else (None, None)
    counts = [] if grid is None else [int(np.prod(row)) // cfg.merge_size**2 for row in grid]

    pieces = _expand_image_pads(_segments(text, assistant_spans(messages, text, render)), counts)
    ids: list[int] = []
    mask: list[int] = []
    for piece, piece_mask in pieces:
        piece_ids = _encode(tokenizer, piece)
        ids += piece_ids
        mask += [piece_mask] * len(piece_ids)
    whole = _encode(tokenizer, "".join(piece for piece, _ in pieces))
    if whole != ids:
        at = next((i for i, (a, b) in enumerate(zip(whole, ids)) if a != b), min(len(whole), len(ids)))
        raise ChatEncodingError(
            f"tokenising the chat piecewise differs from tokenising it whole at token {at} "
            f"(near {tokenizer.decode(whole[max(0, at - 5) : at + 5])!r}): a token crosses an assistant span edge"
        )
    input_ids = np.asarray(ids, dtype=np.int32)
    mm_types = (input_ids == IMAGE_PAD_ID).astype(np.int32) + 2 * (input_ids == VIDEO_PAD_ID).astype(np.int32)
    if int(mm_types.sum()) != sum(counts):
        raise ChatEncodingError(f"{int(mm_types.sum())} image pad tokens for {sum(counts)} image tokens")
    return ChatEncoding(
        input_ids=input_ids,
        assistant_mask=np.asarray(mask, dtype=np.int8),
        mm_token_type_ids=mm_types,
        pixel_values=pixel_values,
        image_grid_thw=grid,
        text=text,
    )
