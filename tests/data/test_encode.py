"""SFT encoding: the loss mask of spec training_and_eval.md §4.2 and the length-only measurement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gsjax.data.config import SFTDataConfig
from gsjax.data.encode import (
    EncodeContext,
    encode_record,
    measure_record,
    widen_over_newline,
)
from gsjax.data.records import EMPTY_THINK, read_records
from gsjax.data.skips import BAD_IMAGE, TOO_LONG, BadRecord
from gsjax.processing.images import ImageProcessorConfig
from gsjax.processing.tokens import IM_END_ID, IMAGE_PAD_ID


def _ctx(tokenizer: Any, path: Path, **overrides: Any) -> EncodeContext:
    return EncodeContext.from_config(SFTDataConfig(path=str(path), **overrides), tokenizer, ImageProcessorConfig())


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_loss_on_every_assistant_turn_and_nothing_else(qwen_tokenizer: Any, tmp_path: Path) -> None:
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(tmp_path / "a.png")
    turns = [("system", "You are an agent."), ("user", "Draw a bridge."),
             ("assistant", "<think>look it up</think>\n<tool_call>\n{\"name\": \"search\"}\n</tool_call>"),
             ("observation", "<image>a bridge photo"), ("assistant", "<answer>{}</answer>")]
    record = {"messages": [{"role": r, "content": c} for r, c in turns], "images": ["a.png"]}
    ex = encode_record(record, _ctx(qwen_tokenizer, tmp_path / "d.json"))
    decode = qwen_tokenizer.decode
    masked = [decode(ex.input_ids[a:b].tolist()) for a, b in _runs(ex.loss_mask)]
    assert masked == [turns[2][1] + "<|im_end|>\n", EMPTY_THINK + turns[4][1] + "<|im_end|>\n"]
    unmasked = decode(ex.input_ids[ex.loss_mask == 0].tolist())
    for text in ("You are an agent.", "Draw a bridge.", "<tool_response>\n", "a bridge photo", "</tool_response>"):
        assert text in unmasked
    assert unmasked.count("<|im_start|>assistant\n") == 2  # headers are prompt, not loss
    grid = ex.image_grid_thw
    assert int((ex.input_ids == IMAGE_PAD_ID).sum()) == int(grid.prod()) // 4 == ex.vision_rows // 4


def test_empty_think_switch(qwen_tokenizer: Any, tmp_path: Path) -> None:
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    on = encode_record(record, _ctx(qwen_tokenizer, tmp_path / "d.json"))
    off = encode_record(record, _ctx(qwen_tokenizer, tmp_path / "d.json", add_empty_think=False))
    assert qwen_tokenizer.decode(on.input_ids[on.loss_mask == 1].tolist()) == EMPTY_THINK + "a<|im_end|>\n"
    assert qwen_tokenizer.decode(off.input_ids[off.loss_mask == 1].tolist()) == "a<|im_end|>\n"


def test_measure_predicts_encoding(qwen_tokenizer: Any, sft_path: Path) -> None:
    ctx = _ctx(qwen_tokenizer, sft_path)
    records = read_records(sft_path)
    assert sum(bool(r["images"]) for r in records) >= 5
    for record in records:
        info, ex = measure_record(record, ctx), encode_record(record, ctx)
        assert (info.length, info.vision_rows) == (len(ex), ex.vision_rows)


def test_over_cutoff_is_refused(qwen_tokenizer: Any, tmp_path: Path) -> None:
    record = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "a"}]}
    ctx = _ctx(qwen_tokenizer, tmp_path / "d.json", cutoff_len=32)
    for fn in (measure_record, encode_record):
        with pytest.raises(BadRecord) as err:
            fn(record, ctx)
        assert err.value.kind == TOO_LONG


def test_an_image_past_the_models_frame_bound_is_a_bad_record(qwen_tokenizer: Any, tmp_path: Path) -> None:
    """A 200x300 image grows to the processor's 65536-pixel floor, 224x320: 14x20 = 280 patches per frame. Refused
    under a bound of 200, with the file named, by the planner's measurement and by the encoder; accepted at 280."""
    Image.fromarray(np.full((200, 300, 3), 90, np.uint8)).save(tmp_path / "big.png")
    record = {"messages": [{"role": "user", "content": "<image>draw it"}, {"role": "assistant", "content": "a"}],
              "images": ["big.png"]}
    config = SFTDataConfig(path=str(tmp_path / "d.json"), max_pixels=160000)
    tight = EncodeContext.from_config(config, qwen_tokenizer, ImageProcessorConfig(), max_frame_rows=200)
    refusal = r"big\.png: .*grid \[1, 14, 20\]\) has 280 patch rows.*vision_max_frame_rows=200"
    for fn in (measure_record, encode_record):
        with pytest.raises(BadRecord, match=refusal) as err:
            fn(record, tight)
        assert err.value.kind == BAD_IMAGE
    enough = EncodeContext.from_config(config, qwen_tokenizer, ImageProcessorConfig(), max_frame_rows=280)
    assert measure_record(record, enough).vision_rows == encode_record(record, enough).vision_rows == 280


def test_widen_over_newline_only_after_masked_im_end() -> None:
    nl = 198
    ids = np.array([5, IM_END_ID, nl, 7, IM_END_ID, nl, 9])
    mask = np.array([1, 1, 0, 0, 0, 0, 1], np.int8)
    np.testing.assert_array_equal(widen_over_newline(ids, mask, nl), [1, 1, 1, 0, 0, 0, 1])
