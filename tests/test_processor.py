"""Image processing: smart_resize, and bit-exact parity with transformers' `Qwen2VLImageProcessorPil`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from gsjax.processor import ImageProcessorConfig, num_image_tokens, process_images, smart_resize
from tests.processor_helpers import random_image

DEFAULT = ImageProcessorConfig()
CAPPED = ImageProcessorConfig(max_pixels=160_000)
PATCH8 = ImageProcessorConfig(patch_size=8, min_pixels=4096, max_pixels=200_000)
CLIP = ImageProcessorConfig(image_mean=tuple(OPENAI_CLIP_MEAN), image_std=tuple(OPENAI_CLIP_STD))


def hf_reference(images: list, cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    out = Qwen2VLImageProcessorPil(**cfg.to_hf_kwargs())(images=images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def assert_same_as_hf(images: list, cfg: ImageProcessorConfig, hf_images: list | None = None) -> np.ndarray:
    pixels, grid = process_images(images, cfg)
    ref_pixels, ref_grid = hf_reference(hf_images if hf_images is not None else images, cfg)
    assert pixels.dtype == np.float32 and grid.dtype == np.int64
    assert np.array_equal(grid, ref_grid)
    assert pixels.shape == ref_pixels.shape
    assert np.array_equal(pixels, ref_pixels)
    return grid


@pytest.mark.parametrize(
    ("size", "resized", "tokens"),
    [
        ((300, 400), (288, 384), 108),
        ((448, 448), (448, 448), 196),
        ((100, 100), (256, 256), 64),
        ((1080, 1920), (1088, 1920), 2040),
        ((300, 500), (288, 512), 144),
    ],
)
def test_smart_resize_spec_examples(size, resized, tokens):
    assert smart_resize(*size) == resized
    assert num_image_tokens(*size, DEFAULT) == tokens


def test_smart_resize_matches_hf_on_a_grid_of_sizes():
    sides = [(h, w) for h in (1, 15, 33, 300, 999, 4100) for w in (7, 64, 500, 1920, 8000)]
    sizes = [(h, w) for h, w in sides if max(h, w) / min(h, w) <= 200]
    for cfg in (DEFAULT, CAPPED, PATCH8):
        for h, w in sizes:
            expected = hf_smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
            assert smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels) == expected, (cfg, h, w)


@pytest.mark.parametrize(("size", "cfg"), [((300, 500), DEFAULT), ((300, 400), DEFAULT), ((100, 100), DEFAULT),
                                           ((216, 384), DEFAULT), ((1080, 1920), CAPPED), ((61, 97), PATCH8),
                                           ((300, 500), PATCH8), ((123, 77), CLIP)])
def test_pixel_values_bit_exact_with_hf(size, cfg):
    grid = assert_same_as_hf([random_image(*size, seed=size[0])], cfg)
    resized = smart_resize(*size, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    assert grid.tolist() == [[1, resized[0] // cfg.patch_size, resized[1] // cfg.patch_size]]


def test_spec_check_values_for_300x500():
    pixels, grid = process_images([random_image(300, 500)], DEFAULT)
    assert pixels.shape == (576, 1536)
    assert grid.tolist() == [[1, 18, 32]]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "I;16"])
def test_non_rgb_pil_modes_match_hf(mode):
    assert_same_as_hf([random_image(90, 140, mode=mode, seed=3)], DEFAULT)


def test_palette_with_transparency_is_composited_on_white_like_hf():
    image = random_image(64, 96, mode="P", seed=4)
    image.info["transparency"] = 0
    pixels, _ = process_images([image], DEFAULT)
    opaque, _ = process_images([random_image(64, 96, mode="P", seed=4)], DEFAULT)
    assert not np.array_equal(pixels, opaque)
    assert_same_as_hf([image], DEFAULT)


@pytest.mark.parametrize("layout", ["hwc3", "hwc4", "hwc1", "chw3"])
def test_uint8_arrays_match_hf(layout):
    rng = np.random.default_rng(5)
    channels = int(layout[-1])
    array = rng.integers(0, 256, (70, 130, channels), dtype=np.uint8)
    if layout.startswith("chw"):
        array = np.ascontiguousarray(array.transpose(2, 0, 1))
    assert_same_as_hf([array], DEFAULT)


def test_several_images_concatenate_rows_in_order():
    images = [random_image(300, 500, seed=1), random_image(100, 100, seed=2), random_image(61, 230, seed=3)]
    grid = assert_same_as_hf(images, DEFAULT)
    pixels, _ = process_images(images, DEFAULT)
    first, _ = process_images(images[:1], DEFAULT)
    assert np.array_equal(pixels[: len(first)], first)
    assert pixels.shape[0] == int(grid.prod(axis=1).sum())


def test_patch_rows_follow_the_spec_layout():
    """Row 0 is the top-left P x P patch; rows 0-3 are the first 2 x 2 merge window; each row holds the
    channel-major patch twice (temporal duplication); values are x / 127.5 - 1."""
    image = random_image(64, 64, seed=6)
    pixels, grid = process_images([image], DEFAULT)
    assert grid.tolist() == [[1, 16, 16]]
    resized = np.asarray(image.resize((256, 256), Image.Resampling.BICUBIC))
    expected = resized.astype(np.float32) / np.float32(127.5) - np.float32(1)
    rows = pixels.reshape(-1, 3, 2, 16, 16)
    assert np.array_equal(rows[:, :, 0], rows[:, :, 1])
    window = [expected[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].transpose(2, 0, 1) for r, c in
              [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)]]
    assert np.array_equal(rows[:5, :, 0], np.stack(window))


def test_path_input_applies_exif_orientation_like_hf_load_image(tmp_path: Path):
    image = random_image(80, 200, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    grid = assert_same_as_hf([path], DEFAULT, hf_images=[load_image(str(path))])
    assert grid.tolist() == [[1, smart_resize(200, 80)[0] // 16, smart_resize(200, 80)[1] // 16]]
    assert_same_as_hf([str(path)], DEFAULT, hf_images=[load_image(str(path))])


def test_missing_file_error_names_the_path(tmp_path: Path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match=r"image 1 .*nope\.jpg"):
        process_images([random_image(50, 50), missing], DEFAULT)


def test_undecodable_file_error_names_the_path(tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ValueError, match=r"image 0 .*broken\.png.*cannot decode"):
        process_images([broken], DEFAULT)


def test_extreme_aspect_ratio_is_refused_with_the_culprit():
    with pytest.raises(ValueError, match=r"image 1 \(array \(5, 1100, 3\).*aspect ratio 220"):
        process_images([random_image(50, 50), np.zeros((5, 1100, 3), np.uint8)], DEFAULT)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


def test_bad_inputs_are_refused_clearly():
    with pytest.raises(TypeError, match="sequence of images"):
        process_images(random_image(20, 20), DEFAULT)
    with pytest.raises(ValueError, match="uint8"):
        process_images([np.zeros((40, 40, 3), np.float32)], DEFAULT)
    with pytest.raises(TypeError, match="unsupported image type"):
        process_images([b"bytes"], DEFAULT)


def test_config_from_hf_preprocessor_config_forms(tmp_path: Path):
    hub = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
           "rescale_factor": 0.00392156862745098, "do_convert_rgb": True}
    assert ImageProcessorConfig.from_hf_config(hub) == DEFAULT
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**hub, "size": {"shortest_edge": 3136,
                                                                                   "longest_edge": 160_000}}))
    assert ImageProcessorConfig.from_model_dir(tmp_path) == ImageProcessorConfig(min_pixels=3136, max_pixels=160_000)
    legacy = {"min_pixels": 3136, "max_pixels": 160_000, "patch_size": 8,
              "size": {"shortest_edge": 1, "longest_edge": 2}}
    cfg = ImageProcessorConfig.from_hf_config(legacy)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.patch_size, cfg.patch_dim) == (3136, 160_000, 8, 384)
    with pytest.raises(ValueError, match="resample=2"):
        ImageProcessorConfig.from_hf_config({**hub, "resample": 2})
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessorConfig(min_pixels=10, max_pixels=5)
