"""One SFT record -> token ids, loss mask and image tensors; and the cheap length-only measurement.

Loss mask (spec training_and_eval.md §4.2): every assistant turn's content and its `<|im_end|>\\n`. That is
`encode_chat`'s assistant mask (which stops at `<|im_end|>`, the RL rule) widened by the newline after each
assistant `<|im_end|>`. `measure_record` predicts the exact token count and vision rows from the rendered
text and the image headers, so the loader can bucket and plan batches before decoding any pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import TemplateError

from gsjax.data.config import SFTDataConfig
from gsjax.data.images import grid_of_size, load_sft_image, read_image_size
from gsjax.data.records import ChatRecord, to_chat
from gsjax.data.skips import BAD_IMAGE, ENCODE_ERROR, TOO_LONG, BadRecord
from gsjax.models.qwen3_vl.vision import check_frame_rows
from gsjax.processing.chat import encode_chat
from gsjax.processing.images import ImageProcessorConfig
from gsjax.processing.template import chat_template, render_chat
from gsjax.processing.tokens import IM_END_ID, IMAGE_PAD, VIDEO_PAD


@dataclass(frozen=True, eq=False)
class EncodeContext:
    """Everything a worker needs to encode records; picklable (the HF tokenizer pickles)."""

    tokenizer: Any
    image_cfg: ImageProcessorConfig
    data_root: Path
    max_pixels: int
    min_pixels: int
    cutoff_len: int
    add_empty_think: bool
    max_frame_rows: int = 0  # the model's runtime.vision_max_frame_rows (0: unbounded)

    @classmethod
    def from_config(cls, cfg: SFTDataConfig, tokenizer: Any, image_cfg: ImageProcessorConfig,
                    max_frame_rows: int = 0) -> EncodeContext:
        return cls(tokenizer=tokenizer, image_cfg=image_cfg, data_root=cfg.data_root, max_pixels=cfg.max_pixels,
                   min_pixels=cfg.min_pixels, cutoff_len=cfg.cutoff_len, add_empty_think=cfg.add_empty_think,
                   max_frame_rows=max_frame_rows)

    @property
    def newline_id(self) -> int:
        ids = list(self.tokenizer.encode("\n", add_special_tokens=False))
        if len(ids) != 1:
            raise ValueError(f"the tokenizer encodes '\\n' as {ids}; expected a single token")
        return ids[0]

    def chat(self, record: Any) -> ChatRecord:
        return to_chat(record, self.data_root, add_empty_think=self.add_empty_think)


@dataclass(frozen=True)
class RecordInfo:
    """What planning needs to know about a valid record."""

    length: int  # tokens
    vision_rows: int  # patch rows over all its images


@dataclass(frozen=True, eq=False)
class EncodedExample:
    input_ids: np.ndarray  # (n,) int32
    loss_mask: np.ndarray  # (n,) int8
    pixel_values: np.ndarray | None  # (rows, patch_dim) float32
    image_grid_thw: np.ndarray | None  # (images, 3) int64

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def vision_rows(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


def widen_over_newline(input_ids: np.ndarray, mask: np.ndarray, newline_id: int) -> np.ndarray:
    """Also mark the token right after each masked `<|im_end|>` when it is the newline."""
    out = np.asarray(mask).copy()
    ends = np.flatnonzero((input_ids[:-1] == IM_END_ID) & (out[:-1] == 1) & (input_ids[1:] == newline_id))
    out[ends + 1] = 1
    return out


def render_text(messages: Sequence[dict[str, Any]], tokenizer: Any) -> str:
    """The conversation rendered exactly as `encode_chat` renders it (tokenizer template, else gsjax's)."""
    template = getattr(tokenizer, "chat_template", None) or chat_template()
    special_tokens = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    try:
        return render_chat(messages, template=template, **special_tokens)
    except (TemplateError, TypeError, ValueError) as exc:
        raise BadRecord(ENCODE_ERROR, f"the chat template refused the conversation: {exc}") from exc


def _check_length(length: int, cutoff_len: int) -> None:
    if length > cutoff_len:
        raise BadRecord(TOO_LONG, f"{length} tokens exceed the cutoff of {cutoff_len}")


def _check_frames(paths: Sequence[Path], grids: Any, max_frame_rows: int) -> None:
    """A frame the vision tower's banded attention cannot hold makes the record unusable (counted, skipped)."""
    for path, grid in zip(paths, np.asarray(grids, dtype=np.int64).reshape(-1, 3)):
        try:
            check_frame_rows(grid, max_frame_rows)
        except ValueError as exc:
            raise BadRecord(BAD_IMAGE, f"{path}: {exc}") from exc


def measure_record(record: Any, ctx: EncodeContext) -> RecordInfo:
    """Token count and vision rows of `encode_record(record)` from the text and image headers only."""
    chat = ctx.chat(record)
    grids = [grid_of_size(*read_image_size(p), ctx.max_pixels, ctx.min_pixels, ctx.image_cfg)
             for p in chat.image_paths]
    text = render_text(chat.messages, ctx.tokenizer)
    if VIDEO_PAD in text or text.count(IMAGE_PAD) != len(grids):
        raise BadRecord(ENCODE_ERROR, "the text holds literal vision pad tokens")
    _check_frames(chat.image_paths, grids, ctx.max_frame_rows)
    merge = ctx.image_cfg.merge_size ** 2
    rows = [t * h * w for t, h, w in grids]
    length = len(ctx.tokenizer.encode(text, add_special_tokens=False)) + sum(r // merge - 1 for r in rows)
    _check_length(length, ctx.cutoff_len)
    return RecordInfo(length=length, vision_rows=sum(rows))


def encode_record(record: Any, ctx: EncodeContext) -> EncodedExample:
    """Decode the images and encode the conversation with the SFT loss mask."""
    chat = ctx.chat(record)
    images = [load_sft_image(p, ctx.max_pixels, ctx.min_pixels) for p in chat.image_paths]
    try:
        enc = encode_chat(chat.messages, ctx.tokenizer, ctx.image_cfg, images=images)
    except ValueError as exc:
        raise BadRecord(ENCODE_ERROR, str(exc)) from exc
    _check_length(len(enc), ctx.cutoff_len)
    if enc.image_grid_thw is not None:
        _check_frames(chat.image_paths, enc.image_grid_thw, ctx.max_frame_rows)
    mask = widen_over_newline(enc.input_ids, enc.assistant_mask, ctx.newline_id)
    return EncodedExample(input_ids=enc.input_ids, loss_mask=mask.astype(np.int8),
                          pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw)
