"""Tiny random HF Qwen3-VL checkpoints built once per session (spec/qwen3vl.md §6 shapes)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gsjax.models.qwen3_vl import reference as R
from gsjax.models.qwen3_vl.checkpoint import load_hf

jax.config.update("jax_default_matmul_precision", "highest")

VARIANTS = {"dense": dict(moe=False, tie=False), "dense-tied": dict(moe=False, tie=True),
            "moe": dict(moe=True, tie=False)}


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("hf")
    return {name: R.build_tiny_hf(root / name, seed=i, **kw) for i, (name, kw) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="session")
def hf_models(hf_dirs):
    return {name: R.load_hf_model(d) for name, d in hf_dirs.items()}


@pytest.fixture(scope="session")
def gs_models(hf_dirs):
    return {name: load_hf(d) for name, d in hf_dirs.items()}


GRIDS = [(1, 6, 4), (1, 4, 8)]


def two_image_batch(padding_side: str, pad: int = 3):
    """Row 0: two images of different sizes; row 1: text only, shorter, padded on `padding_side`."""
    row0 = R.image_prompt(GRIDS, 200, 202, 203)
    row1 = np.arange(10, 10 + row0.size - pad)
    pad_ids = np.zeros(pad, np.int64)
    row1 = np.concatenate([pad_ids, row1]) if padding_side == "left" else np.concatenate([row1, pad_ids])
    mask1 = np.concatenate([np.zeros(pad), np.ones(row0.size - pad)]) if padding_side == "left" \
        else np.concatenate([np.ones(row0.size - pad), np.zeros(pad)])
    ids = np.stack([row0, row1])
    mask = np.stack([np.ones(row0.size), mask1]).astype(np.int64)
    return ids, mask
