"""SFTDataConfig: derived buckets, data root, and refusal of bad settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from gsjax.data.config import SFTDataConfig


def test_buckets_end_at_the_cutoff_and_root_defaults_to_the_file_dir() -> None:
    cfg = SFTDataConfig(path=Path("/d/sft.jsonl"), buckets=(4096, 512, 1024, 512), cutoff_len=3000)
    assert cfg.length_buckets == (512, 1024, 3000)
    assert cfg.data_root == Path("/d") and cfg.path == "/d/sft.jsonl"
    assert SFTDataConfig(path="x.json", image_root="/imgs").data_root == Path("/imgs")
    assert SFTDataConfig(path="x", worker_count=3).index_workers == 3
    assert SFTDataConfig(path="x", worker_count=3, index_worker_count=0).index_workers == 0


@pytest.mark.parametrize("bad", [
    {"on_bad_record": "ignore"},
    {"batch_size": 0},
    {"min_pixels": 10, "max_pixels": 5},
    {"vision_row_buckets": (64, 66)},
    {"min_vision_rows": 30},
    {"worker_count": -1},
    {"loss_position_buckets": ()},
    {"loss_position_buckets": (64, 0)},
])
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        SFTDataConfig(path="x.json", **bad)


def test_from_dict_refuses_unknown_keys() -> None:
    assert SFTDataConfig.from_dict({"path": "x", "buckets": [256, 512]}).buckets == (256, 512)
    with pytest.raises(ValueError, match="batchsize"):
        SFTDataConfig.from_dict({"path": "x", "batchsize": 2})
