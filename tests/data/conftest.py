"""Fixtures for the SFT input pipeline tests: the tiny model config and a small synthetic SFT set on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from gsjax.data.synthetic import SyntheticSpec, write_synthetic_sft
from gsjax.models.qwen3_vl.config import Qwen3VLConfig, preset

SMALL_SPEC = SyntheticSpec(words=(3, 30), image_side=(16, 520))


@pytest.fixture(scope="session")
def tiny_model_cfg() -> Qwen3VLConfig:
    return preset("tiny")


@pytest.fixture(scope="session")
def sft_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 synthetic records (multi-turn, tool turns, about half with images) as JSONL."""
    return write_synthetic_sft(tmp_path_factory.mktemp("sft"), 20, seed=3, spec=SMALL_SPEC)
