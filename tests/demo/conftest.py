"""One tiny random diffusers pipeline per session, copied into each demo work folder (building it costs
seconds; `ensure_tiny_pipeline` then finds it in place)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gsjax.demo.context import Layout
from gsjax.demo.services import ensure_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_pipeline(tmp_path_factory.mktemp("demo_pipeline") / "pipeline")


@pytest.fixture
def workdir(tmp_path: Path, tiny_pipeline: Path) -> Path:
    """A demo work folder that already holds the tiny pipeline."""
    shutil.copytree(tiny_pipeline, Layout(tmp_path).pipeline)
    return tmp_path
