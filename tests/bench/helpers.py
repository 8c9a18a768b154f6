"""Shared helpers: a moderately sized 8B-shaped model that compiles in seconds on 8 fake CPU devices."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from gsjax.models.qwen3_vl.config import Qwen3VLConfig, preset

NEEDS_8 = pytest.mark.skipif(jax.device_count() < 8,
                             reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def calibration_config(remat: str = "none", layers: int = 2, hidden: int = 512, inter: int = 1536,
                       vocab: int = 16384, attention: str = "xla") -> Qwen3VLConfig:
    """8B's layout (GQA 4:1, untied head) at a width where activations, not fixed overheads, dominate."""
    base = preset("8b")
    text = dataclasses.replace(base.text, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                               mrope_section=(12, 10, 10))
    vision = dataclasses.replace(base.vision, depth=2, hidden_size=128, intermediate_size=256, num_heads=4,
                                 out_hidden_size=hidden, deepstack_visual_indexes=(0, 1))
    config = dataclasses.replace(base, text=text, vision=vision, image_token_id=vocab - 4,
                                 video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
                                 vision_end_token_id=vocab - 1)
    return config.with_runtime(remat=remat, attention_impl=attention).validate()
