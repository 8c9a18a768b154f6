"""transformers/PyTorch Qwen3-VL as the numerical reference: tiny random checkpoints and reference logits.

Used by the parity tests, `scripts/check_logits.py` and `scripts/bench_forward.py`. torch and the HF
model classes are imported lazily: nothing else in gsjax needs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TINY_TEXT: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 3, 3],
                     "mrope_interleaved": True},
)
TINY_MOE: dict[str, Any] = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                                decoder_sparse_step=1, mlp_only_layers=[])
TINY_VISION: dict[str, Any] = dict(
    depth=4, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=8, temporal_patch_size=2,
    spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=36, deepstack_visual_indexes=[0, 2, 3],
)
TINY_IDS = dict(image_token_id=200, video_token_id=201, vision_start_token_id=202, vision_end_token_id=203)


def _hf_classes(moe: bool):
    import transformers as tf

    if moe:
        return tf.Qwen3VLMoeConfig, tf.Qwen3VLMoeForConditionalGeneration
    return tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration


def build_tiny_hf(directory: str | Path, *, moe: bool = False, tie: bool = False, seed: int = 0,
                  text: dict | None = None, vision: dict | None = None, ids: dict | None = None,
                  dtype: str = "float32") -> Path:
    """Save a random HF Qwen3-VL(-MoE) checkpoint (norm weights randomised too) with `save_pretrained`."""
    import torch

    config_cls, model_cls = _hf_classes(moe)
    text_cfg = {**TINY_TEXT, **(TINY_MOE if moe else {}), **(text or {})}
    config = config_cls(text_config=text_cfg, vision_config={**TINY_VISION, **(vision or {})},
                        tie_word_embeddings=tie, **{**TINY_IDS, **(ids or {})})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2 or "experts" in name:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    model = model.to(getattr(torch, dtype))
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory


def load_hf_model(directory: str | Path, dtype: str = "float32", attention: str = "eager"):
    """The transformers model of a checkpoint directory (eager attention by default), eval mode, on CPU."""
    import json

    import torch

    moe = json.loads((Path(directory) / "config.json").read_text())["model_type"] == "qwen3_vl_moe"
    _, model_cls = _hf_classes(moe)
    model = model_cls.from_pretrained(directory, dtype=getattr(torch, dtype), attn_implementation=attention)
    return model.eval()


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None, positions: np.ndarray,
              pixel_values: np.ndarray | None = None, image_grid_thw: np.ndarray | None = None) -> np.ndarray:
    """Reference logits (fp32 numpy). Explicit (3, B, L) position ids, as the spec requires for 5.23."""
    import torch

    kwargs: dict[str, Any] = dict(
        input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
        position_ids=torch.as_tensor(np.asarray(positions), dtype=torch.long),
    )
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if pixel_values is not None:
        dtype = next(model.parameters()).dtype
        kwargs["pixel_values"] = torch.as_tensor(np.asarray(pixel_values)).to(dtype)
        kwargs["image_grid_thw"] = torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.long)
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits.float().numpy()


def image_prompt(grids: list[tuple[int, int, int]], image_token_id: int, vision_start: int, vision_end: int,
                 merge: int = 2, text_ids: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)) -> np.ndarray:
    """Token ids `[t, t, VS, IMG×n, VE, t, …]` with one image per grid, text tokens interleaved (spec §6)."""
    it = iter(text_ids)
    ids: list[int] = [next(it), next(it)]
    for t, h, w in grids:
        ids += [vision_start] + [image_token_id] * (t * h * w // merge**2) + [vision_end] + [next(it)]
    ids += list(it)
    return np.asarray(ids, dtype=np.int64)


def random_pixels(grids: list[tuple[int, int, int]], patch_dim: int, seed: int = 0) -> np.ndarray:
    rows = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).uniform(-1, 1, size=(rows, patch_dim)).astype(np.float32)
