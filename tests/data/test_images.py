"""SFT image path: LLaMA-Factory pre-shrink, header-only grids, decode errors as typed refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsjax.data.images import (
    grid_of_size,
    load_sft_image,
    preshrink_size,
    read_image_size,
)
from gsjax.data.skips import BAD_IMAGE, MISSING_IMAGE, BadRecord
from gsjax.processing.images import ImageProcessorConfig, process_image


def test_preshrink_bounds() -> None:
    assert preshrink_size(1000, 1000, 160000, 1024) == (400, 400)
    assert preshrink_size(800, 600, 160000, 1024) == (461, 346)  # int() truncation of 800/sqrt(3), 600/sqrt(3)
    assert preshrink_size(300, 200, 160000, 1024) == (300, 200)
    assert preshrink_size(10, 10, 160000, 1024) == (32, 32)
    with pytest.raises(BadRecord) as err:
        preshrink_size(400000, 1, 160000, 1024)
    assert err.value.kind == BAD_IMAGE


def test_loaded_image_matches_predicted_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 256, (700, 500), dtype=np.uint8)).convert("P").save(path)
    cfg = ImageProcessorConfig()
    img = load_sft_image(path, 160000, 1024)
    assert img.mode == "RGB" and img.size == preshrink_size(500, 700, 160000, 1024)
    with Image.open(path) as raw:  # palette images resize with PIL's mode default, NEAREST, before RGB
        expected = np.asarray(raw.resize(img.size, Image.Resampling.NEAREST).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(img), expected)
    _, grid = process_image(img, cfg)
    assert grid == grid_of_size(*read_image_size(path), 160000, 1024, cfg)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(BadRecord) as err:
        read_image_size(tmp_path / "none.png")
    assert err.value.kind == MISSING_IMAGE
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(BadRecord) as err:
        read_image_size(junk)
    assert err.value.kind == BAD_IMAGE
    truncated = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    assert read_image_size(truncated) == (64, 64)  # the header is intact ...
    with pytest.raises(BadRecord) as err:  # ... decoding is not
        load_sft_image(truncated, 160000, 1024)
    assert err.value.kind == BAD_IMAGE
