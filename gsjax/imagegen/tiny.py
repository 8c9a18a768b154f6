"""Tiny random Qwen-Image pipelines, built offline, so the image server can be exercised end to end on a
CPU (tests, demos) with the same diffusers classes and folder layout as the real models.

`QwenImageEditPlusPipeline` VAE-encodes every reference at a fixed ~1024x1024 area (a module constant), so
the tiny VAE downsamples 32x (five levels) with 4 base channels to keep a CPU call to a few seconds; a server
for demos also lowers that area (`--reference-vae-area`, TINY_REFERENCE_VAE_AREA).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gsjax.imagegen.pipelines import PipelineSpec

TINY_KINDS = ("edit-plus", "text")

TINY_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
TINY_CALL_DEFAULTS = {"height": 64, "width": 64}
"""Output size for the tiny pipeline (a multiple of its 64-pixel latent patch); the real model's default
(~1024x1024) would cost seconds per VAE decode on CPU."""
TINY_REFERENCE_VAE_AREA = 128 * 128
"""Area at which the tiny edit pipeline VAE-encodes a reference when served for demos (a 2x2 grid of
64-pixel latent patches); at the pipeline's fixed 1024x1024 encoding a 64x64 call took 1.7 s on 2 cores."""


def _tiny_tokenizer() -> Any:
    """A byte-level Qwen2 tokenizer with no merges (256 byte tokens + Qwen's special tokens): offline and
    tiny, and it tokenises any text."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    for token in TINY_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(TINY_SPECIAL_TOKENS[1:])})
    return tokenizer


def _tiny_text_encoder(tokenizer: Any) -> Any:
    """A 2-layer, 16-wide Qwen2.5-VL (vision tower included) over the tiny vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab_size = len(tokenizer)
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": vocab_size,
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=vocab_size,
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=token_id("<|im_end|>"),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _tiny_components() -> dict[str, Any]:
    """The shared components of the tiny Qwen-Image and Qwen-Image-Edit-Plus pipelines."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )

    z_dim, levels = 4, 5
    tokenizer = _tiny_tokenizer()
    return {
        "tokenizer": tokenizer,
        "text_encoder": _tiny_text_encoder(tokenizer),
        "transformer": QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * z_dim,
            out_channels=z_dim,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=16,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        ),
        "vae": AutoencoderKLQwenImage(
            base_dim=4,
            z_dim=z_dim,
            dim_mult=[1] * (levels + 1),
            num_res_blocks=1,
            temperal_downsample=[False] * levels,
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
        ),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }


def _save_processor(folder: Path, tokenizer: Any) -> None:
    """Write the processor folder in the layout of the real Qwen-Image-Edit-2509 (`preprocessor_config.json`
    + tokenizer files), with a pixel budget of at most 8x8 merged patches for the tiny vision tower."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_tiny_pipeline(out_dir: str | Path, kind: str = "edit-plus", seed: int = 0) -> Path:
    """Save a tiny random pipeline to `out_dir` and return it. `edit-plus` is a `QwenImageEditPlusPipeline`
    (the default server class, with a `processor/` folder); `text` is a `QwenImagePipeline` (text-only)."""
    import torch
    from diffusers import QwenImageEditPlusPipeline, QwenImagePipeline

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose one of {TINY_KINDS}")
    out = Path(out_dir)
    torch.manual_seed(seed)
    components = _tiny_components()
    if kind == "text":
        QwenImagePipeline(**components).save_pretrained(out)
        return out
    # The processor is written by hand: diffusers would record the image-only subclass's module as its
    # library, and the real layout names `transformers.Qwen2VLProcessor`.
    QwenImageEditPlusPipeline(**components, processor=None).save_pretrained(out)
    _save_processor(out / "processor", components["tokenizer"])
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def tiny_spec(path: Path) -> PipelineSpec:
    """The serving spec for a tiny pipeline built by `build_tiny_pipeline` (class read from the folder)."""
    return PipelineSpec(path=Path(path), dtype="float32", call_defaults=dict(TINY_CALL_DEFAULTS))
