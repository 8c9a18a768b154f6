"""Diffusers pipelines for the image server: load any pipeline class from a local folder and call it with
a request's fields, so the server is not tied to Qwen-Image-Edit.

Everything torch/diffusers is imported inside functions, so importing `gsjax.imagegen` (the client, the
schema) never pulls in torch.

transformers 5.23 cannot build `Qwen2VLProcessor` without torchvision (its video processor needs it), so
when torchvision is missing an image-only subclass is built from the folder's `processor/` files (the PIL
image processor + tokenizer) and handed to `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import inspect
import json
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from gsjax.errors import InputFileNotFound
from gsjax.imagegen.schema import GenerationParams

QWEN_PROCESSOR_CLASSES = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


REFERENCE_AREA_CONSTANT = "VAE_IMAGE_SIZE"


class ImageInput(str, Enum):
    """Whether a pipeline needs, accepts, or rejects reference images."""

    REQUIRED = "required"
    OPTIONAL = "optional"
    NONE = "none"


@dataclass(frozen=True)
class PipelineSpec:
    """What to load and how to call it. `class_name` None means the folder's `model_index.json` names it;
    `call_defaults` are extra pipeline kwargs (e.g. `height`/`width`) applied to every call unless the
    request sets them; `image_input` None means infer from the class."""

    path: Path
    class_name: str | None = None
    dtype: str = "auto"
    image_input: ImageInput | None = None
    call_defaults: dict[str, Any] = field(default_factory=dict)
    reference_vae_area: int | None = None  # see set_reference_vae_area; None keeps the pipeline's own


def pipeline_class(class_name: str) -> type:
    """The diffusers pipeline class named `class_name`; a clear error for anything else."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise TypeError(f"{class_name!r} is not a diffusers pipeline class (diffusers {diffusers.__version__})")
    return cls


def read_model_index(path: Path) -> dict[str, Any]:
    """The folder's `model_index.json`; a clear error when `path` is not a saved diffusers pipeline."""
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise InputFileNotFound(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{index_file} is not valid JSON ({exc})") from None
    if not isinstance(index, dict):
        raise TypeError(f"{index_file} must hold a JSON object")
    return index


def resolve_class_name(spec: PipelineSpec) -> str:
    """The configured class, else the `_class_name` the folder was saved with."""
    if spec.class_name:
        return spec.class_name
    name = read_model_index(spec.path).get("_class_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{spec.path}/model_index.json has no _class_name; pass the pipeline class explicitly")
    return name


def infer_image_input(cls: type) -> ImageInput:
    """Pipelines without an `image` argument are text-to-image; with one, images are required (the edit
    pipelines crash on `image=None`). Override with `PipelineSpec.image_input` for pipelines that differ."""
    return ImageInput.REQUIRED if "image" in inspect.signature(cls.__call__).parameters else ImageInput.NONE


def resolve_dtype(name: str, device: str) -> Any:
    """`auto` is bf16 on accelerators (the upstream serving dtype) and fp32 on CPU."""
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"unknown torch dtype {name!r}")
    return dtype


def _torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _image_only_processor_class() -> type:
    """`Qwen2VLProcessor` with image processor + tokenizer only (its sub-processors are read from this
    `__init__` signature), so it builds without torchvision."""
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def load_image_only_processor(folder: Path) -> Any:
    """The Qwen2-VL processor in `folder` (image processor + tokenizer files) built without torchvision."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return _image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer)


def _component_overrides(path: Path) -> dict[str, Any]:
    """Components that `from_pretrained` cannot build in this environment, built here instead."""
    index = read_model_index(path)
    overrides: dict[str, Any] = {}
    for name, entry in index.items():
        is_qwen_processor = isinstance(entry, list) and len(entry) == 2 and entry[1] in QWEN_PROCESSOR_CLASSES
        if is_qwen_processor and not _torchvision_available():
            overrides[name] = load_image_only_processor(path / name)
    return overrides


def set_reference_vae_area(cls: type, area: int) -> None:
    """Make `cls` VAE-encode each reference image at about `area` pixels (aspect kept).

    Qwen-Image-Edit-Plus reads the area from a module constant (`VAE_IMAGE_SIZE`, 1024 x 1024, what the real
    model was trained with), whatever the output size. A tiny test pipeline spent 95 % of a 64 x 64 call
    encoding a reference at that size on a CPU (1.6 of 1.7 s). The constant is per module, so this is for a
    server process that loads one pipeline class; any other class is refused by name."""
    module = sys.modules[cls.__module__]
    if not hasattr(module, REFERENCE_AREA_CONSTANT):
        raise ValueError(f"{cls.__name__} has no {REFERENCE_AREA_CONSTANT} in {cls.__module__}: a reference VAE "
                         "area applies to pipelines that encode references at a fixed area (QwenImageEditPlusPipeline)")
    if area < 32 * 32:
        raise ValueError(f"reference VAE area must be >= {32 * 32} pixels, got {area}")
    setattr(module, REFERENCE_AREA_CONSTANT, area)


def load_pipeline(spec: PipelineSpec, device: str) -> Any:
    """Load `spec.class_name` from `spec.path` onto `device`, local files only."""
    cls = pipeline_class(resolve_class_name(spec))
    if spec.reference_vae_area is not None:
        set_reference_vae_area(cls, spec.reference_vae_area)
    path = Path(spec.path)
    pipe = cls.from_pretrained(
        path, dtype=resolve_dtype(spec.dtype, device), local_files_only=True, **_component_overrides(path)
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(pipe: Any, spec: PipelineSpec, params: GenerationParams, images: list[Any]) -> dict[str, Any]:
    """The request's fields, restricted to what this pipeline's `__call__` accepts (SD3 has no
    `true_cfg_scale`, for instance); height/width only when the request or the server sets them."""
    accepted = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = dict(spec.call_defaults)
    kwargs.update(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        true_cfg_scale=params.true_cfg_scale,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        num_images_per_prompt=params.num_images_per_prompt,
    )
    for key in ("height", "width"):
        if getattr(params, key) is not None:
            kwargs[key] = getattr(params, key)
    if images:
        kwargs["image"] = images[0] if len(images) == 1 else images
    return {k: v for k, v in kwargs.items() if k in accepted}


def run_pipeline(pipe: Any, spec: PipelineSpec, device: str, params: GenerationParams, images: list[Any]) -> list[Any]:
    """One blocking pipeline call with a generator seeded by `params.seed`; returns PIL images."""
    import torch

    generator = torch.Generator(device=device).manual_seed(params.seed)
    with torch.inference_mode():
        output = pipe(**call_kwargs(pipe, spec, params, images), generator=generator)
    return list(output.images)


def available_devices() -> list[str]:
    """Every visible CUDA device, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def park_pipeline(pipe: Any) -> None:
    """Move a pipeline off its accelerator (to CPU) so a fresh one fits while reloading."""
    pipe.to("cpu")
    free_accelerator_memory()


def free_accelerator_memory() -> None:
    """Return cached CUDA memory after a pipeline is dropped or moved."""
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class DiffusersPipelineFactory:
    """Builds, parks, restores and drops diffusers pipelines for the device workers."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.name = resolve_class_name(spec)
        self.image_input = spec.image_input or infer_image_input(pipeline_class(self.name))

    def build(self, device: str) -> Any:
        return load_pipeline(self.spec, device)

    def park(self, pipe: Any) -> None:
        park_pipeline(pipe)

    def restore(self, pipe: Any, device: str) -> None:
        pipe.to(device)

    def discard(self, pipe: Any) -> None:
        del pipe
        free_accelerator_memory()

    def generate(self, pipe: Any, device: str, params: GenerationParams, images: list[Any]) -> list[Any]:
        return run_pipeline(pipe, self.spec, device, params, images)
