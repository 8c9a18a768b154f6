"""Images -> `pixel_values`, `image_grid_thw` for the Qwen3-VL vision tower (spec/qwen3vl.md §5.1).

Bit-exact with transformers' `Qwen2VLImageProcessorPil` (the class 5.23 uses without torchvision) using only
numpy and PIL, so rollout, training and evaluation can share one resize without torch. Each step mirrors the
reference's arithmetic, not just its maths: RGB conversion (alpha over white for in-memory images, a plain
`convert("RGB")` after EXIF transpose for files, like HF's `load_image`), PIL bicubic on uint8, then
`float32(float64(x) * rescale)` and `(x - mean) / std` in float32. Those last two are a 256-entry table per
channel, which is both exact and cheap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gsjax.errors import InputFileNotFound

ImageInput = Union[Image.Image, np.ndarray, str, Path]

MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The §5.1 processor values; defaults are the Qwen3-VL hub `preprocessor_config.json`."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ImageProcessorConfig.{name} must be positive, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"ImageProcessorConfig.min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})"
            )
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"ImageProcessorConfig.{name} needs 3 values (RGB), got {value}")
            object.__setattr__(self, name, value)
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"ImageProcessorConfig.image_std must be non-zero, got {self.image_std}")

    @property
    def factor(self) -> int:
        """Both resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one `pixel_values` row: 3 * T * P * P."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ImageProcessorConfig:
        """Read an HF `preprocessor_config.json` dict (`size={shortest_edge, longest_edge}` or
        `min_pixels`/`max_pixels`, the latter winning like HF's constructor); refuse settings this
        processor does not implement rather than silently computing something else."""
        unsupported = {
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": int(Image.Resampling.BICUBIC),
        }
        for key, expected in unsupported.items():
            if key in config and config[key] is not None and config[key] != expected:
                raise ValueError(f"preprocessor config {key}={config[key]!r} is not supported (need {expected!r})")
        size = dict(config.get("size") or {})
        min_pixels = config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_pixels = config.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        defaults = cls()
        return cls(
            patch_size=int(config.get("patch_size", defaults.patch_size)),
            temporal_patch_size=int(config.get("temporal_patch_size", defaults.temporal_patch_size)),
            merge_size=int(config.get("merge_size", defaults.merge_size)),
            min_pixels=int(min_pixels if min_pixels is not None else defaults.min_pixels),
            max_pixels=int(max_pixels if max_pixels is not None else defaults.max_pixels),
            image_mean=tuple(config.get("image_mean", defaults.image_mean)),
            image_std=tuple(config.get("image_std", defaults.image_std)),
            rescale_factor=float(config.get("rescale_factor", defaults.rescale_factor)),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ImageProcessorConfig:
        """Read `<model_dir>/preprocessor_config.json`."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            raise InputFileNotFound(f"no preprocessor_config.json in {model_dir}")
        return cls.from_hf_config(json.loads(path.read_text()))

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Every value passed explicitly, for `Qwen2VLImageProcessorPil(**kwargs)` (spec §5.5)."""
        return {
            "do_resize": True,
            "resample": int(Image.Resampling.BICUBIC),
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }


def smart_resize_many(height: np.ndarray, width: np.ndarray, factor: int = 32, min_pixels: int = 65536,
                      max_pixels: int = 16777216) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`smart_resize` over arrays of positive sizes: (h_bar, w_bar, ok), ok False where the aspect ratio is
    refused. float64 throughout, as the reference's Python floats (np.round is half-to-even like `round`), so
    both give the same sizes; `frame_rows` pushes millions of sizes through it."""
    h = np.asarray(height, np.float64)
    w = np.asarray(width, np.float64)
    ok = np.maximum(h, w) / np.minimum(h, w) <= MAX_ASPECT_RATIO
    h_bar = np.round(h / factor) * factor
    w_bar = np.round(w / factor) * factor
    shrink = h_bar * w_bar > max_pixels
    grow = ~shrink & (h_bar * w_bar < min_pixels)
    beta = np.sqrt(h * w / max_pixels)
    h_bar = np.where(shrink, np.maximum(factor, np.floor(h / beta / factor) * factor), h_bar)
    w_bar = np.where(shrink, np.maximum(factor, np.floor(w / beta / factor) * factor), w_bar)
    beta = np.sqrt(min_pixels / (h * w))
    h_bar = np.where(grow, np.ceil(h * beta / factor) * factor, h_bar)
    w_bar = np.where(grow, np.ceil(w * beta / factor) * factor, w_bar)
    return h_bar.astype(np.int64), w_bar.astype(np.int64), ok


def smart_resize(
    height: int, width: int, factor: int = 32, min_pixels: int = 65536, max_pixels: int = 16777216
) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Python `round` is half-to-even, as in the reference (300x400 -> 288x384)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    h_bar, w_bar, ok = smart_resize_many(np.array([height]), np.array([width]), factor, min_pixels, max_pixels)
    if not ok[0]:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"aspect ratio {ratio:.1f} of a {height}x{width} image exceeds {MAX_ASPECT_RATIO}")
    return int(h_bar[0]), int(w_bar[0])


def image_grid(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int, int]:
    """The `image_grid_thw` row for an image of this size: (1, h/P, w/P)."""
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def num_image_tokens(height: int, width: int, cfg: ImageProcessorConfig) -> int:
    """How many `<|image_pad|>` tokens the image becomes (h * w / factor^2)."""
    _, gh, gw = image_grid(height, width, cfg)
    return gh * gw // (cfg.merge_size**2)


def _describe(image: ImageInput, index: int) -> str:
    if isinstance(image, (str, Path)):
        return f"image {index} ({image})"
    if isinstance(image, np.ndarray):
        return f"image {index} (array {image.shape} {image.dtype})"
    return f"image {index} ({type(image).__name__} {getattr(image, 'size', '')} {getattr(image, 'mode', '')})"


def load_image_file(path: str | Path) -> np.ndarray:
    """HF `load_image` semantics for a local file: decode fully, EXIF transpose, `convert("RGB")`."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot decode image file {path}: {exc}") from exc


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """HF `convert_to_rgb` for a PIL image: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """HF `convert_to_rgb` for a uint8 array: (H, W), channels-first or -last with 1/3/4 channels.

    Like HF, a leading axis of size 1/3/4 means channels-first even when the last axis also fits."""
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim != 3:
        raise ValueError(f"image arrays must be (H, W) or 3-D, got shape {array.shape}")
    elif array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    elif array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot find the channel axis (1, 3 or 4 channels) in shape {array.shape}")
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """Any supported input -> contiguous (H, W, 3) uint8 RGB, following the reference per input kind."""
    if isinstance(image, (str, Path)):
        rgb = load_image_file(image)
    elif isinstance(image, Image.Image):
        rgb = _pil_to_rgb(image)
    elif isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image)
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}; use a PIL image, uint8 array or path")
    return np.ascontiguousarray(rgb)


def _normalize_table(cfg: ImageProcessorConfig) -> np.ndarray:
    """(256, 3) float32: the reference's rescale (fp64 product cast to fp32) then normalise (fp32)."""
    levels = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)[:, None]
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return (levels - mean) / std


def patchify(image: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """(h, w, 3) float32 -> (gh*gw, 3*T*P*P) rows in merge-window order, each frame repeated T times.

    Row order: merge windows raster order, then the m x m patches inside a window; row layout: channel,
    temporal copy, patch row, patch column (the reference's (C, T, P, P) flattening)."""
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    h, w, c = image.shape
    gh, gw = h // p, w // p
    x = image.reshape(gh // m, m, p, gw // m, m, p, c)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return x.reshape(gh * gw, c * t * p * p)


def process_image(image: ImageInput, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel rows (gh*gw, patch_dim) float32, grid (1, gh, gw))."""
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), resample=Image.Resampling.BICUBIC))
    table = _normalize_table(cfg)
    normalized = table[resized, np.arange(3)]
    return patchify(normalized, cfg), (1, h // cfg.patch_size, w // cfg.patch_size)


def process_images(images: Sequence[ImageInput], cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (`pixel_values` float32 (N, 3*T*P*P), `image_grid_thw` int64 (n, 3)), rows concatenated
    in input order. Errors name the offending image (index and path/shape)."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        raise TypeError("process_images takes a sequence of images; wrap a single image in a list")
    if len(images) == 0:
        raise ValueError("process_images needs at least one image")
    rows, grids = [], []
    for index, image in enumerate(images):
        try:
            pixels, grid = process_image(image, cfg)
        except FileNotFoundError as exc:
            raise InputFileNotFound(f"{_describe(image, index)}: {exc}") from exc
        except TypeError as exc:
            raise TypeError(f"{_describe(image, index)}: {exc}") from exc
        except (ValueError, OSError) as exc:
            raise ValueError(f"{_describe(image, index)}: {exc}") from exc
        rows.append(pixels)
        grids.append(grid)
    return np.concatenate(rows, axis=0), np.asarray(grids, dtype=np.int64)
