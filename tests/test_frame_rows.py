"""The largest image frame under a pixel budget (`vision_max_frame_rows: auto`): the vectorised resize equals
transformers' smart_resize, no image through the real SFT or agent pipeline exceeds the bound, the bound is
reached, and the large recipes derive theirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from gsjax.data.images import grid_of_size
from gsjax.data.skips import BadRecord
from gsjax.processing.frame_rows import largest_agent_frame, largest_sft_frame
from gsjax.processing.images import ImageProcessorConfig, image_grid, smart_resize, smart_resize_many
from gsjax.train.config import SFTConfig, SFTConfigError
from gsjax.train.grpo_config import GRPOConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _random_sizes(count: int, largest: int, seed: int) -> list[tuple[int, int]]:
    """Log-uniform sides: tiny, thin and huge images alike."""
    sides = np.exp(np.random.default_rng(seed).uniform(0, np.log(largest), (count, 2))).astype(int)
    return [(int(h), int(w)) for h, w in sides]


def test_vectorised_resize_equals_the_reference_smart_resize() -> None:
    """smart_resize_many (which smart_resize and the bounds use) against transformers' own function."""
    sizes = _random_sizes(20000, 40000, seed=1) + [(300, 400), (78, 12756), (1, 150), (15, 3000), (16, 48)]
    h = np.array([s[0] for s in sizes])
    w = np.array([s[1] for s in sizes])
    for lo, hi in [(65536, 160000), (1024, 16384), (4096, 4096)]:
        got_h, got_w, ok = smart_resize_many(h, w, 32, lo, hi)
        for i, (height, width) in enumerate(sizes):
            try:
                expected = hf_smart_resize(height, width, 32, lo, hi)
            except ValueError:
                assert not ok[i]
                continue
            assert ok[i] and (got_h[i], got_w[i]) == expected, (height, width, lo, hi)


def _agent_rows(height: int, width: int, lo: int, hi: int, cfg: ImageProcessorConfig) -> int:
    view_h, view_w = smart_resize(height, width, cfg.factor, lo, hi)
    _, gh, gw = image_grid(view_h, view_w, cfg)
    return gh * gw


@pytest.mark.parametrize("lo, hi", [(65536, 160000), (1024, 16384)])
def test_no_policy_view_exceeds_the_agent_bound_and_a_thin_image_reaches_it(lo: int, hi: int) -> None:
    for cfg in (ImageProcessorConfig(), ImageProcessorConfig(min_pixels=lo, max_pixels=hi)):
        bound = largest_agent_frame(lo, hi, cfg)
        seen = 0
        for height, width in _random_sizes(40000, 30000, seed=2):
            try:
                seen = max(seen, _agent_rows(height, width, lo, hi, cfg))
            except ValueError:  # aspect ratio past 200: refused either way
                continue
        assert 0 < seen <= bound
    # a thin image: the shrink branch clamps its short side up to 32 pixels, so the view exceeds max_pixels
    assert _agent_rows(30, 6000, 65536, 160000, ImageProcessorConfig()) == 704  # a 32 x 5632 view
    assert largest_agent_frame(65536, 160000, ImageProcessorConfig()) == 704


def test_no_sft_image_exceeds_the_sft_bound_and_the_bound_is_reached() -> None:
    cfg = ImageProcessorConfig()
    small = 6000  # every size is enumerable at this budget
    bound = largest_sft_frame(small, cfg)
    reached = 0
    for height in range(1, 400):
        for width in range(1, 400):
            try:
                _, gh, gw = grid_of_size(width, height, small, 1024, cfg)
            except BadRecord:
                continue
            reached = max(reached, gh * gw)
    for height, width in _random_sizes(20000, 40000, seed=3):
        try:
            _, gh, gw = grid_of_size(width, height, small, 1024, cfg)
        except BadRecord:
            continue
        assert gh * gw <= bound
    assert reached == bound


@pytest.mark.parametrize("name", ["sft_qwen3vl_8b_8xgpu", "sft_tpu_pod", "grpo_qwen3vl_8b_gpu", "grpo_tpu_pod"])
def test_the_large_recipes_derive_their_bound(name: str) -> None:
    """The 8B / pod recipes use `auto`: SFT under max_pixels 160000 gets 832 rows, the agent's 65536-160000
    pixel views 660 (the hand-set 704 was the hub processor's bound, not the env-range processor's)."""
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert raw["model"]["vision_max_frame_rows"] == "auto"
    raw["model"] = {"preset": "tiny", "vision_max_frame_rows": "auto"}  # the recipe's checkpoint is not here
    if name.startswith("sft"):
        raw["data"]["path"] = "x.jsonl"
        assert SFTConfig.from_dict(raw).model_config().runtime.vision_max_frame_rows == 832
    else:
        raw.setdefault("data", {})["path"] = "tasks.json"
        assert GRPOConfig.from_dict(raw).model_config().runtime.vision_max_frame_rows == 660


def test_auto_resolves_through_the_run_config_only() -> None:
    sft = SFTConfig.from_dict({"model": {"preset": "tiny", "vision_max_frame_rows": "auto"},
                               "train": {"steps": 1}, "data": {"path": "x.jsonl", "max_pixels": 6000}})
    expected = largest_sft_frame(6000, ImageProcessorConfig())
    assert sft.model_config().runtime.vision_max_frame_rows == expected > 0
    with pytest.raises(SFTConfigError, match="auto"):
        sft.model.resolve()
    grpo = GRPOConfig.from_dict({"model": {"preset": "tiny", "vision_max_frame_rows": "auto"},
                                 "data": {"path": "tasks.json"},
                                 "env": {"image_min_pixels": 1024, "image_max_pixels": 16384}})
    assert grpo.model_config().runtime.vision_max_frame_rows == largest_agent_frame(
        1024, 16384, ImageProcessorConfig(min_pixels=1024, max_pixels=16384))
    fixed = GRPOConfig.from_dict({"model": {"vision_max_frame_rows": 96}, "data": {"path": "tasks.json"}})
    assert fixed.model_config().runtime.vision_max_frame_rows == 96
    with pytest.raises(SFTConfigError):
        SFTConfig.from_dict({"model": {"vision_max_frame_rows": "most"}, "train": {"steps": 1}})
