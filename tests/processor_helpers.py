"""Test inputs shared by the processor/tokenizer/chat tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def random_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A noise image (noise exercises every bicubic tap) in the requested PIL mode."""
    rng = np.random.default_rng(seed)
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), mode="RGBA")
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")
    if mode == "P":
        return rgb.quantize(colors=64)
    return rgb.convert(mode)
