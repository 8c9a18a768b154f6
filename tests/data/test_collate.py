"""Host batch contract: shift, target mask, M-RoPE positions per row, vision rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gsjax.data.collate import VISION_KEYS, collate, empty_vision
from gsjax.data.config import SFTDataConfig
from gsjax.data.encode import EncodeContext, EncodedExample, encode_record
from gsjax.data.records import read_records
from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.models.qwen3_vl.rope import get_rope_index
from gsjax.models.qwen3_vl.vision import vision_inputs
from gsjax.processing.images import ImageProcessorConfig

PAD = 151643


@pytest.fixture(scope="module")
def examples(qwen_tokenizer: Any, sft_path: Path) -> list[EncodedExample]:
    """Four encoded synthetic records, two with images and two without."""
    ctx = EncodeContext.from_config(SFTDataConfig(path=str(sft_path)), qwen_tokenizer, ImageProcessorConfig())
    records = read_records(sft_path)
    with_img = [r for r in records if r["images"]][:2]
    without = [r for r in records if not r["images"]][:2]
    return [encode_record(r, ctx) for r in (with_img[0], without[0], with_img[1], without[1])]


def _rope(ids: np.ndarray, grid: np.ndarray | None, cfg: Qwen3VLConfig) -> np.ndarray:
    return get_rope_index(ids[None], image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                          spatial_merge_size=cfg.vision.spatial_merge_size, image_grid_thw=grid)[0][:, 0]


def test_batch_contract(examples: list[EncodedExample], tiny_model_cfg: Qwen3VLConfig) -> None:
    rows = [*examples, None]  # an empty row, as a skipped record or a partial batch leaves
    length = max(len(e) for e in examples) + 7
    total_rows = sum(e.vision_rows for e in examples)
    batch = collate(rows, length, total_rows + 64, tiny_model_cfg, PAD)
    assert batch["input_ids"].shape == batch["targets"].shape == (5, length)
    assert batch["input_ids"].dtype == batch["targets"].dtype == np.int32
    assert batch["attention_mask"].dtype == bool and batch["target_mask"].dtype == np.float32
    assert batch["positions"].shape == (3, 5, length) and batch["positions"].dtype == np.int32
    for r, ex in enumerate(rows):
        n = 0 if ex is None else len(ex)
        assert batch["attention_mask"][r].sum() == n and np.all(batch["input_ids"][r, n:] == PAD)
        assert batch["targets"][r, -1] == PAD
        if ex is None:
            assert batch["target_mask"][r].sum() == 0 and np.all(batch["positions"][:, r] == 0)
            continue
        np.testing.assert_array_equal(batch["targets"][r, : n - 1], ex.input_ids[1:])
        # what the row is trained to predict is exactly its loss tokens (the first token is never a loss token)
        predicted = batch["targets"][r][batch["target_mask"][r] > 0]
        assert ex.loss_mask[0] == 0
        np.testing.assert_array_equal(predicted, ex.input_ids[ex.loss_mask == 1])
        np.testing.assert_array_equal(batch["positions"][:, r, :n], _rope(ex.input_ids, ex.image_grid_thw,
                                                                          tiny_model_cfg))
        assert np.all(batch["positions"][:, r, n:] == 0)
    assert batch["num_tokens"] == int(batch["target_mask"].sum()) == sum(int(e.loss_mask[1:].sum()) for e in examples)


def test_vision_rows(examples: list[EncodedExample], tiny_model_cfg: Qwen3VLConfig) -> None:
    total_rows = sum(e.vision_rows for e in examples)
    pad_to = total_rows + 64
    vision = collate(examples, 2048, pad_to, tiny_model_cfg, PAD)["vision"]
    with_img = [e for e in examples if e.pixel_values is not None]
    expected = vision_inputs(np.concatenate([e.pixel_values for e in with_img]),
                             np.concatenate([e.image_grid_thw for e in with_img]), tiny_model_cfg.vision, pad_to)
    assert set(vision) == set(VISION_KEYS)
    for key in VISION_KEYS:
        np.testing.assert_array_equal(vision[key], getattr(expected, key))
    assert np.all(vision["segment_ids"][total_rows:] == -1) and np.all(vision["segment_ids"][:total_rows] >= 0)


def test_text_only_batches(examples: list[EncodedExample], tiny_model_cfg: Qwen3VLConfig) -> None:
    text_only = [e for e in examples if e.pixel_values is None]
    assert collate(text_only, 2048, None, tiny_model_cfg, PAD)["vision"] is None
    padded = collate(text_only, 2048, 128, tiny_model_cfg, PAD)["vision"]  # another host has images
    reference = empty_vision(128, tiny_model_cfg.vision)
    image = examples[0]
    real = vision_inputs(image.pixel_values, image.image_grid_thw, tiny_model_cfg.vision)
    for key in VISION_KEYS:
        assert padded[key].dtype == getattr(real, key).dtype
        assert padded[key].shape[1:] == getattr(real, key).shape[1:]
        np.testing.assert_array_equal(padded[key], reference[key])
    assert np.all(padded["segment_ids"] == -1)
    with pytest.raises(ValueError, match="no vision rows"):
        collate(examples, 2048, None, tiny_model_cfg, PAD)
