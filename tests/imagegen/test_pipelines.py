"""Loading and calling diffusers pipelines by config: class from the folder, request fields mapped onto
what each pipeline's `__call__` accepts."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from gsjax.imagegen.pipelines import (
    ImageInput,
    PipelineSpec,
    call_kwargs,
    infer_image_input,
    load_pipeline,
    pipeline_class,
    resolve_class_name,
    resolve_dtype,
    run_pipeline,
    set_reference_vae_area,
)
from gsjax.imagegen.schema import GenerationParams


class SD3Like:
    """A pipeline without `true_cfg_scale` (as Stable Diffusion 3): those fields must not be passed."""

    def __call__(self, prompt, negative_prompt=None, image=None, num_inference_steps=28, height=None, width=None):
        raise AssertionError("never called here")


def test_call_kwargs_keep_only_what_the_pipeline_accepts():
    spec = PipelineSpec(path=".", call_defaults={"height": 64, "width": 64})
    params = GenerationParams(prompt="p", num_inference_steps=3, true_cfg_scale=7.0, width=128)
    kwargs = call_kwargs(SD3Like(), spec, params, ["img0"])
    assert kwargs == {"prompt": "p", "negative_prompt": " ", "num_inference_steps": 3, "height": 64,
                      "width": 128, "image": "img0"}
    assert call_kwargs(SD3Like(), spec, params, ["a", "b"])["image"] == ["a", "b"]
    assert "image" not in call_kwargs(SD3Like(), spec, params, [])


def test_pipeline_class_comes_from_the_folder_unless_configured(tiny_text_path, tmp_path):
    assert resolve_class_name(PipelineSpec(path=tiny_text_path)) == "QwenImagePipeline"
    assert resolve_class_name(PipelineSpec(path=tiny_text_path, class_name="X")) == "X"
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_class_name(PipelineSpec(path=tmp_path))
    (tmp_path / "model_index.json").write_text("{broken")
    with pytest.raises(ValueError, match="is not valid JSON"):
        resolve_class_name(PipelineSpec(path=tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ValueError, match="has no _class_name"):
        resolve_class_name(PipelineSpec(path=tmp_path))


def test_reference_image_support_is_read_from_the_pipeline_signature():
    assert infer_image_input(pipeline_class("QwenImageEditPlusPipeline")) is ImageInput.REQUIRED
    assert infer_image_input(pipeline_class("QwenImagePipeline")) is ImageInput.NONE
    with pytest.raises(TypeError, match="'AutoencoderKL' is not a diffusers pipeline class"):
        pipeline_class("AutoencoderKL")


def test_auto_dtype_is_bf16_on_accelerators_and_fp32_on_cpu():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16


def test_reference_vae_area_shrinks_the_reference_encoding_of_the_edit_pipeline(tiny_edit_path, monkeypatch):
    """The edit pipeline encodes each reference at a module-constant area; the spec's reference_vae_area sets
    it (the VAE then sees a ~128x128 reference, not ~1024x1024) and the output keeps the requested size."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    monkeypatch.setattr(module, "VAE_IMAGE_SIZE", module.VAE_IMAGE_SIZE)  # restored after the test
    spec = PipelineSpec(path=tiny_edit_path, dtype="float32", call_defaults={"height": 64, "width": 64},
                        reference_vae_area=128 * 128)
    pipe = load_pipeline(spec, "cpu")
    assert module.VAE_IMAGE_SIZE == 128 * 128
    seen = []
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x, *a, **k: seen.append(tuple(x.shape)) or encode(x, *a, **k))
    reference = Image.new("RGB", (300, 150), (200, 40, 40))
    params = GenerationParams(prompt="a red banner", num_inference_steps=1, true_cfg_scale=1.0)
    (image,) = run_pipeline(pipe, spec, "cpu", params, [reference])
    assert image.size == (64, 64)
    (shape,) = seen  # one reference, wide like the input, about 128*128 pixels (sides rounded to 32): 64x192
    height, width = shape[-2:]
    assert width > height and height % 32 == width % 32 == 0, shape
    assert 0.5 * 128 * 128 <= height * width <= 1.5 * 128 * 128, shape  # the default would be ~1024*1024


def test_reference_vae_area_is_refused_for_pipelines_without_one(monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    monkeypatch.setattr(module, "VAE_IMAGE_SIZE", module.VAE_IMAGE_SIZE)
    with pytest.raises(ValueError, match="QwenImagePipeline has no VAE_IMAGE_SIZE"):
        set_reference_vae_area(pipeline_class("QwenImagePipeline"), 128 * 128)
    with pytest.raises(ValueError, match="must be >= 1024 pixels, got 100"):
        set_reference_vae_area(pipeline_class("QwenImageEditPlusPipeline"), 100)
