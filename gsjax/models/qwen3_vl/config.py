"""Typed Qwen3-VL configuration (dense and MoE), read from and written to HF `config.json`.

Both the hub (transformers 4.57) form and the transformers 5.x form are accepted
(spec/qwen3vl.md §1.2); the defaults that silently differ in HF are made explicit (§1.3).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gsjax.errors import InputError, InputFileNotFound

log = logging.getLogger(__name__)

HF_DEFAULT_ROPE_THETA = 500000.0  # Qwen3VLTextConfig's default when a file omits it (spec §1.3).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_out")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(InputError, ValueError):
    """A config field is missing, inconsistent or unsupported; the message names the field."""


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6  # hard-coded in HF, not read from the file

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one patchified pixel row: C·T·P·P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    def validate(self) -> None:
        if self.grid_side**2 != self.num_position_embeddings:
            raise ConfigError(
                f"vision_config.num_position_embeddings={self.num_position_embeddings} is not a perfect square"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config.hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim={self.head_dim} must be divisible by 4 (2-D rotary)")
        if list(self.deepstack_visual_indexes) != sorted(set(self.deepstack_visual_indexes)):
            raise ConfigError(
                f"vision_config.deepstack_visual_indexes={list(self.deepstack_visual_indexes)} must be ascending"
            )
        if any(not 0 <= i < self.depth for i in self.deepstack_visual_indexes):
            raise ConfigError(
                f"vision_config.deepstack_visual_indexes={list(self.deepstack_visual_indexes)} "
                f"out of range for depth={self.depth}"
            )


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 262144
    # MoE (num_experts == 0 means dense everywhere)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """HF's rule (spec §1.2): MoE iff not mlp-only, experts exist, and (l+1) % sparse_step == 0."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def validate(self) -> None:
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ConfigError(
                f"text_config mrope_section={list(self.mrope_section)} must sum to head_dim/2={self.head_dim // 2}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}"
            )


@dataclass(frozen=True)
class RuntimeConfig:
    """How the model runs (not part of the HF checkpoint): precision, attention kernel, remat."""

    param_dtype: str = "float32"
    dtype: str = "float32"  # activation / compute dtype; norms, softmax and RoPE tables stay fp32
    attention_impl: Literal["auto", "xla", "cudnn", "chunked"] = "auto"
    attention_chunk: int = 128  # query block for the "chunked" causal kernel
    moe_impl: Literal["ragged", "dense"] = "ragged"
    # one policy for all text layers, or one per layer (spec: selectable per layer by config)
    remat: str | tuple[str, ...] = "none"
    vision_remat: str = "none"
    # The most patch rows one image frame can have (its grid h·w; 0: not bounded). When set, the vision tower's
    # block-diagonal attention reads a band of 3× that many keys per query block instead of every row of the
    # batch (O(N·rows) not O(N²) in time and memory), and inputs with a larger frame are refused.
    vision_max_frame_rows: int = 0

    def remat_for_layer(self, layer: int, num_layers: int) -> str:
        if isinstance(self.remat, str):
            return self.remat
        if len(self.remat) != num_layers:
            raise ConfigError(f"runtime.remat lists {len(self.remat)} policies for {num_layers} layers")
        return self.remat[layer]

    def validate(self) -> None:
        for name in (self.param_dtype, self.dtype):
            if name not in DTYPES:
                raise ConfigError(f"dtype {name!r} not one of {DTYPES}")
        if self.vision_max_frame_rows < 0:
            raise ConfigError(f"vision_max_frame_rows must be >= 0 (0: unbounded), got {self.vision_max_frame_rows}")
        if self.attention_chunk < 1:
            raise ConfigError(f"attention_chunk must be >= 1, got {self.attention_chunk}")
        policies = (self.remat,) if isinstance(self.remat, str) else self.remat
        for p in (*policies, self.vision_remat):
            if p not in REMAT_POLICIES:
                raise ConfigError(f"remat policy {p!r} not one of {REMAT_POLICIES}")


@dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def is_moe(self) -> bool:
        return self.text.num_experts > 0

    @property
    def model_type(self) -> str:
        return "qwen3_vl_moe" if self.is_moe else "qwen3_vl"

    def validate(self) -> Qwen3VLConfig:
        self.text.validate()
        self.vision.validate()
        self.runtime.validate()
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision_config.out_hidden_size={self.vision.out_hidden_size} != "
                f"text_config.hidden_size={self.text.hidden_size}"
            )
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, name) < self.text.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} outside vocab_size={self.text.vocab_size}")
        return self

    def with_runtime(self, **kw: Any) -> Qwen3VLConfig:
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **kw))

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], runtime: RuntimeConfig | None = None) -> Qwen3VLConfig:
        """Parse an HF `config.json` dict in the 4.57 hub form or the 5.x form."""
        model_type = d.get("model_type", "")
        if model_type not in ("qwen3_vl", "qwen3_vl_moe"):
            raise ConfigError(f"config.json model_type={model_type!r} is not qwen3_vl or qwen3_vl_moe")
        if "text_config" not in d or "vision_config" not in d:
            raise ConfigError("config.json lacks text_config or vision_config")
        text = _text_from_hf(d["text_config"], moe=model_type == "qwen3_vl_moe")
        vision = _vision_from_hf(d["vision_config"])
        ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                 "vision_end_token_id") if k in d}
        return cls(
            text=text, vision=vision, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            runtime=runtime or RuntimeConfig(), **ids,
        ).validate()

    @classmethod
    def from_file(cls, path: str | Path, runtime: RuntimeConfig | None = None) -> Qwen3VLConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise InputFileNotFound(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(d, runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """Hub-style (4.57) config that transformers 5.x and vLLM/SGLang both read."""
        t, v = self.text, self.vision
        text_cfg: dict[str, Any] = {
            "model_type": "qwen3_vl_moe_text" if self.is_moe else "qwen3_vl_text",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0,
            "max_position_embeddings": t.max_position_embeddings, "rope_theta": t.rope_theta,
            "rope_scaling": {"rope_type": "default", "mrope_section": list(t.mrope_section),
                             "mrope_interleaved": True},
            "bos_token_id": 151643, "eos_token_id": 151645,
            "dtype": self.runtime.param_dtype, "initializer_range": 0.02, "use_cache": True,
        }
        if self.is_moe:
            text_cfg.update(
                num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
                moe_intermediate_size=t.moe_intermediate_size, decoder_sparse_step=t.decoder_sparse_step,
                mlp_only_layers=list(t.mlp_only_layers), norm_topk_prob=True,
                router_aux_loss_coef=t.router_aux_loss_coef,
            )
        vision_cfg = {
            "model_type": "qwen3_vl_moe" if self.is_moe else "qwen3_vl",
            "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
            "in_channels": v.in_channels, "out_hidden_size": v.out_hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "hidden_act": "gelu_pytorch_tanh", "initializer_range": 0.02,
        }
        return {
            "architectures": ["Qwen3VLMoeForConditionalGeneration" if self.is_moe
                              else "Qwen3VLForConditionalGeneration"],
            "model_type": self.model_type,
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": text_cfg, "vision_config": vision_cfg,
            "dtype": self.runtime.param_dtype,
        }


def _text_from_hf(tc: dict[str, Any], moe: bool) -> TextConfig:
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    theta = rope.get("rope_theta", tc.get("rope_theta"))
    if theta is None:
        log.warning("text_config has no rope_theta; using HF's default %s (released models use 5e6)",
                    HF_DEFAULT_ROPE_THETA)
        theta = HF_DEFAULT_ROPE_THETA
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if key not in tc:
            raise ConfigError(f"text_config.{key} is missing")
    if "num_key_value_heads" not in tc:
        raise ConfigError("text_config.num_key_value_heads is missing (HF's default differs for dense and MoE)")
    if "head_dim" not in tc:
        raise ConfigError("text_config.head_dim is missing (HF derives it differently for dense and MoE)")
    head_dim = int(tc["head_dim"])
    section = tuple(rope.get("mrope_section", ()))
    if not section:
        raise ConfigError("text_config rope mrope_section is missing")
    fields: dict[str, Any] = dict(
        vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"], intermediate_size=tc["intermediate_size"],
        num_hidden_layers=tc["num_hidden_layers"], num_attention_heads=tc["num_attention_heads"],
        num_key_value_heads=tc["num_key_value_heads"], head_dim=head_dim,
        rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        mrope_section=section, max_position_embeddings=int(tc.get("max_position_embeddings", 262144)),
    )
    if moe:
        experts = tc.get("num_experts", tc.get("num_local_experts"))
        if experts is None:
            raise ConfigError("MoE text_config has neither num_experts nor num_local_experts")
        fields.update(
            num_experts=int(experts), num_experts_per_tok=int(tc["num_experts_per_tok"]),
            moe_intermediate_size=int(tc["moe_intermediate_size"]),
            decoder_sparse_step=int(tc.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(tc.get("mlp_only_layers", ()) or ()),
            router_aux_loss_coef=float(tc.get("router_aux_loss_coef", 0.001)),
        )
    return TextConfig(**fields)


def _vision_from_hf(vc: dict[str, Any]) -> VisionConfig:
    rope = vc.get("rope_parameters") or {}
    known = {f.name for f in dataclasses.fields(VisionConfig)} - {"rope_theta", "layer_norm_eps"}
    kw = {k: vc[k] for k in known if k in vc}
    if "deepstack_visual_indexes" in kw:
        kw["deepstack_visual_indexes"] = tuple(kw["deepstack_visual_indexes"])
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(kw.get(key), (list, tuple)):
            raise ConfigError(f"vision_config.{key}={kw[key]} as a list is not supported")
    return VisionConfig(rope_theta=float(rope.get("rope_theta", 10000.0)), **kw)


# ---------------------------------------------------------------------- presets
def _preset(text: dict[str, Any], vision: dict[str, Any], tie: bool) -> Qwen3VLConfig:
    return Qwen3VLConfig(text=TextConfig(**text), vision=VisionConfig(**vision), tie_word_embeddings=tie)


_VISION_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                     deepstack_visual_indexes=(5, 11, 17))
_VISION_LARGE = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                     deepstack_visual_indexes=(8, 16, 24))

PRESETS: dict[str, Qwen3VLConfig] = {
    "2b": _preset(dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       intermediate_size=6144), dict(_VISION_SMALL, out_hidden_size=2048), tie=True),
    "4b": _preset(dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=9728), dict(_VISION_SMALL, out_hidden_size=2560), tie=True),
    "8b": _preset(dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=12288), dict(_VISION_LARGE, out_hidden_size=4096), tie=False),
    "30b-a3b": _preset(dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                            intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=768), dict(_VISION_LARGE, out_hidden_size=2048), tie=False),
    # A tiny random model with the spec's trap-catching shapes (§6): q width ≠ hidden, mrope tail.
    "tiny": _preset(dict(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, mrope_section=(6, 3, 3)),
                    dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=16,
                         out_hidden_size=64, num_position_embeddings=36, deepstack_visual_indexes=(0, 2, 3)),
                    tie=False),
    "tiny-moe": _preset(dict(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=24, mrope_section=(6, 3, 3),
                             num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24),
                        dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=16,
                             out_hidden_size=64, num_position_embeddings=36, deepstack_visual_indexes=(0, 2, 3)),
                        tie=False),
}


def preset(name: str) -> Qwen3VLConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[key].validate()
