"""Encoded examples -> the host batch the learner consumes (numpy, fixed shapes).

Contract: `input_ids` int32 (B, L) right-padded; `attention_mask` bool; `targets` = input_ids shifted left
(last = pad); `target_mask` float32 = loss_mask[t+1] & attention_mask[t+1] (position t predicts token t+1);
`positions` int32 (3, B, L) from `get_rope_index`; `vision` the tower's inputs over all images of the batch,
rows padded to the planned bucket (or None); `num_tokens` = sum(target_mask); `loss_positions` (B, K) int32
the positions with a trained target, padded with L-1 (never trained), K from a few sizes, or None when K
would not be smaller than L (the loss then applies the LM head only there: `gsjax.train.model_loss`). Empty
rows (padding of a partial batch, or a record skipped at encode time) are all padding and carry no loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from gsjax.data.buckets import configured_bucket, ladder_bucket
from gsjax.data.encode import EncodedExample
from gsjax.models.qwen3_vl.config import Qwen3VLConfig, VisionConfig
from gsjax.models.qwen3_vl.rope import get_rope_index
from gsjax.models.qwen3_vl.vision import VisionInputs, vision_inputs

VISION_KEYS = tuple(f.name for f in dataclasses.fields(VisionInputs))


def empty_vision(rows: int, cfg: VisionConfig) -> dict[str, np.ndarray]:
    """Vision input with only padding rows: for a host without images when another host has some."""
    return {
        "pixel_values": np.zeros((rows, cfg.patch_dim), np.float32),
        "pos_index": np.zeros((rows, 4), np.int32),
        "pos_weight": np.zeros((rows, 4), np.float32),
        "rope_pos": np.zeros((rows, 2), np.int32),
        "segment_ids": np.full((rows,), -1, np.int32),
    }


def batch_vision(examples: Sequence[EncodedExample | None], rows: int | None, cfg: VisionConfig,
                 max_frame_rows: int = 0) -> tuple[dict[str, np.ndarray] | None, np.ndarray | None]:
    """(vision dict padded to `rows`, concatenated image_grid_thw) for the images of the batch, in row order."""
    with_images = [e for e in examples if e is not None and e.pixel_values is not None]
    if rows is None:
        if with_images:
            raise ValueError("the plan has no vision rows for a batch that holds images")
        return None, None
    if not with_images:
        return empty_vision(rows, cfg), None
    pixels = np.concatenate([e.pixel_values for e in with_images])
    grid = np.concatenate([e.image_grid_thw for e in with_images])
    inputs = vision_inputs(pixels, grid, cfg, pad_to=rows, max_frame_rows=max_frame_rows)
    return {k: np.asarray(getattr(inputs, k)) for k in VISION_KEYS}, grid


def shift_targets(input_ids: np.ndarray, loss_mask: np.ndarray, attention_mask: np.ndarray,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(targets, target_mask): position t predicts token t+1, counted only where t+1 is a real loss token."""
    batch = input_ids.shape[0]
    targets = np.concatenate([input_ids[:, 1:], np.full((batch, 1), pad_id, input_ids.dtype)], axis=1)
    nxt = (loss_mask[:, 1:] > 0) & attention_mask[:, 1:]
    target_mask = np.concatenate([nxt, np.zeros((batch, 1), bool)], axis=1).astype(np.float32)
    return targets.astype(np.int32), target_mask


MIN_LOSS_POSITIONS = 64


def loss_positions(target_mask: np.ndarray, buckets: tuple[int, ...] | None = None) -> np.ndarray | None:
    """(B, K) positions of each row's trained targets in order, padded with L-1 (its target is never
    trained: see `shift_targets`); None when the bucketed K would not be below L. K is the smallest of
    `buckets` that holds every row's targets (fewer K, fewer compiled programs), else `ladder_bucket`'s."""
    batch, length = target_mask.shape
    trained = target_mask > 0
    if trained[:, -1].any():
        raise ValueError("the last position of a row cannot carry a trained target")
    most = int(trained.sum(axis=1).max(initial=0))
    k = ladder_bucket(most, MIN_LOSS_POSITIONS) if buckets is None else configured_bucket(most, buckets)
    if k >= length:
        return None
    out = np.full((batch, k), length - 1, np.int32)
    for row in range(batch):
        where = np.flatnonzero(trained[row])
        out[row, : where.size] = where
    return out


def collate(examples: Sequence[EncodedExample | None], length: int, vision_rows: int | None,
            model_cfg: Qwen3VLConfig, pad_id: int, loss_position_buckets: tuple[int, ...] | None = None
            ) -> dict[str, Any]:
    """Stack examples (None = empty row) into one (B, `length`) batch."""
    batch = len(examples)
    input_ids = np.full((batch, length), pad_id, np.int32)
    loss_mask = np.zeros((batch, length), np.int8)
    attention_mask = np.zeros((batch, length), bool)
    for row, example in enumerate(examples):
        if example is None:
            continue
        n = len(example)
        if n > length:
            raise ValueError(f"row {row} has {n} tokens, more than the batch length {length}")
        input_ids[row, :n] = example.input_ids
        loss_mask[row, :n] = example.loss_mask
        attention_mask[row, :n] = True
    vision, grid = batch_vision(examples, vision_rows, model_cfg.vision, model_cfg.runtime.vision_max_frame_rows)
    positions, _ = get_rope_index(input_ids, image_token_id=model_cfg.image_token_id,
                                  video_token_id=model_cfg.video_token_id,
                                  spatial_merge_size=model_cfg.vision.spatial_merge_size,
                                  attention_mask=attention_mask, image_grid_thw=grid)
    targets, target_mask = shift_targets(input_ids, loss_mask, attention_mask, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        "target_mask": target_mask,
        "positions": np.asarray(positions, np.int32),
        "vision": vision,
        "num_tokens": int(target_mask.sum()),
        "loss_positions": loss_positions(target_mask, loss_position_buckets),
    }
