"""Qwen3-VL (dense and MoE) in Flax NNX, matching transformers' PyTorch implementation."""

from .config import ConfigError, Qwen3VLConfig, RuntimeConfig, TextConfig, VisionConfig, preset
from .model import DecodeCache, ModelOutput, Qwen3VL, prepare_inputs
from .vision import VisionInputs, vision_inputs

__all__ = [
    "ConfigError", "DecodeCache", "ModelOutput", "Qwen3VL", "Qwen3VLConfig", "RuntimeConfig", "TextConfig",
    "VisionConfig", "VisionInputs", "prepare_inputs", "preset", "vision_inputs",
]
