"""SFT image handling: LLaMA-Factory's pre-shrink, then the processor's smart-resize (spec agent.md §4.4).

Upstream SFT opens each file with PIL (no EXIF transpose), shrinks it proportionally to <= `max_pixels`
(`int` truncation of each side), grows it to >= `min_pixels` the same way, then converts to RGB; the Qwen3-VL
processor then smart-resizes to multiples of 32. `grid_of_file` predicts the resulting grid from the header
alone, so sequence lengths are known before any pixel is decoded.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from gsjax.data.skips import BAD_IMAGE, MISSING_IMAGE, BadRecord
from gsjax.processing.images import ImageProcessorConfig, image_grid

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _scale_to(width: int, height: int, pixels: int) -> tuple[int, int]:
    factor = math.sqrt(pixels / (width * height))
    return int(width * factor), int(height * factor)


def preshrink_size(width: int, height: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """(width, height) after LLaMA-Factory's `_preprocess_image` bounds: shrink, then grow, sides truncated."""
    if width * height > max_pixels:
        width, height = _scale_to(width, height, max_pixels)
    if width > 0 and height > 0 and width * height < min_pixels:
        width, height = _scale_to(width, height, min_pixels)
    if width <= 0 or height <= 0:
        raise BadRecord(BAD_IMAGE, f"the image degenerates to {width}x{height} pixels when resized")
    return width, height


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise BadRecord(MISSING_IMAGE, f"image file not found: {path}")


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    _check_exists(path)
    try:
        with Image.open(path) as img:
            return img.size
    except _DECODE_ERRORS as exc:
        raise BadRecord(BAD_IMAGE, f"cannot read image {path}: {exc}") from exc


def grid_of_size(width: int, height: int, max_pixels: int, min_pixels: int,
                 image_cfg: ImageProcessorConfig) -> tuple[int, int, int]:
    """The `image_grid_thw` row an image of this size ends up with after pre-shrink and smart-resize."""
    w, h = preshrink_size(width, height, max_pixels, min_pixels)
    try:
        return image_grid(h, w, image_cfg)
    except ValueError as exc:
        raise BadRecord(BAD_IMAGE, str(exc)) from exc


def load_sft_image(path: Path, max_pixels: int, min_pixels: int) -> Image.Image:
    """Decode fully and apply the pre-shrink, as upstream (resize in the file's own mode with PIL's default
    filter for that mode, then RGB)."""
    _check_exists(path)
    try:
        with Image.open(path) as img:
            img.load()
            size = preshrink_size(img.width, img.height, max_pixels, min_pixels)
            out = img.resize(size) if size != img.size else img.copy()
        return out if out.mode == "RGB" else out.convert("RGB")
    except BadRecord:
        raise
    except _DECODE_ERRORS as exc:
        raise BadRecord(BAD_IMAGE, f"cannot decode image {path}: {exc}") from exc
