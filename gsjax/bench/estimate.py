"""`gsjax estimate`: analytic per-device memory of one SFT train step for any model size and mesh.

Nothing is allocated or compiled: the train state is sized from the real parameter layout
(`state_bytes`), activations from per-device tensor sizes (`activations`). The total is comparable to
XLA's `memory_analysis()` read as `xla_peak_bytes` below, for text-only batches (vision activations are
not modelled; frozen or trainable vision weights are counted).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.parallel.mesh import MESH_AXES, MeshConfig
from gsjax.parallel.sharding import DEFAULT_RULES, Rules, logical_to_spec
from gsjax.train.state import OptimizerSettings

from .activations import ActivationBytes, LocalDims, Recompute, activation_bytes, chunked_keys_per_query
from .state_bytes import StateBytes, abstract_mesh, state_bytes

Backend = Literal["gpu", "tpu", "cpu"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-device bytes of one train step at its peak; `total` is comparable to `xla_peak_bytes`."""

    params: int
    frozen: int
    optimizer: int
    grads: int
    activations: ActivationBytes
    trainable_count: int
    frozen_count: int
    tokens_per_device: int
    recompute: Recompute
    attention_kernel: str

    @property
    def state(self) -> int:
        return self.params + self.frozen + self.optimizer

    @property
    def total(self) -> int:
        return self.state + self.grads + self.activations.total

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["activations"] = {**asdict(self.activations), "total": self.activations.total}
        out.update(state=self.state, total=self.total)
        return out


def xla_peak_bytes(stats: Any) -> int:
    """XLA's per-device peak for a compiled step: arguments + outputs − aliased outputs + temporaries.

    Arguments (the state and batch) stay live for the whole program; donated outputs reuse their
    argument buffers (alias), so only the non-aliased outputs add; temp is the buffer assignment's
    peak of everything else.
    """
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.temp_size_in_bytes)


def parse_mesh(text: str) -> MeshConfig:
    """'fsdp=8', 'fsdp=4,tensor=2', 'data=2 x fsdp=4' → MeshConfig; unnamed axes are 1, -1 fills."""
    sizes = {a: 1 for a in MESH_AXES}
    items = [p for p in re.split(r"(?:[,\s×]|(?<=[\d\s])x(?=[a-z\s]))+", text.strip()) if p]
    if not items:
        raise ValueError(f"mesh {text!r} names no axes; write e.g. 'fsdp=8' or 'fsdp=4,tensor=2'")
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in sizes:
            raise ValueError(f"mesh item {item!r} is not AXIS=SIZE with AXIS one of {MESH_AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh item {item!r}: size {value!r} is not an integer") from None
    return MeshConfig(**sizes)


def resolve_kernel(impl: str, backend: Backend, dtype: str) -> str:
    """The attention kernel `attend` would pick for this backend (mirrors attention.resolve_impl)."""
    if impl == "auto":
        impl = {"gpu": "cudnn", "cpu": "chunked"}.get(backend, "xla")
    if impl == "cudnn" and dtype not in ("bfloat16", "float16"):
        return "xla"  # cuDNN flash attention only runs in half precision; attend falls back
    return impl


def _local(shape: tuple[int, ...], names: tuple[str | None, ...], sizes: dict[str, int], rules: Rules) -> tuple:
    mesh = abstract_mesh(sizes)
    spec = logical_to_spec(names, shape, mesh, rules, what=f"activation {names}")
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.append(dim // math.prod(sizes[a] for a in axes))
    return tuple(out)


def local_dims(config: Qwen3VLConfig, sizes: dict[str, int], batch: int, seq: int, kernel: str,
               rules: Rules = DEFAULT_RULES, logits_chunk: int = 0) -> LocalDims:
    """Per-device tensor sizes under the activation rules the model's `constrain` calls use; with
    `logits_chunk` the loss holds one (rows, chunk, V) block of logits at a time."""
    t = config.text
    rows, length, hidden = _local((batch, seq, t.hidden_size), ("act_batch", "act_length", "act_embed"), sizes,
                                  rules)
    _, _, heads, _ = _local((batch, seq, t.num_attention_heads, t.head_dim),
                            ("act_batch", "act_length", "act_heads", None), sizes, rules)
    _, _, kv_heads, _ = _local((batch, seq, t.num_key_value_heads, t.head_dim),
                               ("act_batch", "act_length", "act_heads", None), sizes, rules)
    _, _, inter = _local((batch, seq, t.intermediate_size), ("act_batch", "act_length", "act_mlp"), sizes, rules)
    _, _, vocab = _local((batch, seq, t.vocab_size), ("act_batch", "act_length", "act_vocab"), sizes, rules)
    moe_inter = t.moe_intermediate_size // sizes.get("tensor", 1) if t.num_experts else 0
    tokens = rows * length
    if kernel == "cudnn":
        keys = 0.0
    elif kernel == "chunked":
        keys = chunked_keys_per_query(seq, config.runtime.attention_chunk)
    else:
        keys = float(seq)
    return LocalDims(
        tokens=tokens, seq=seq, hidden=hidden, inter=inter, q_width=heads * t.head_dim,
        kv_width=kv_heads * t.head_dim, heads=heads, head_dim=t.head_dim, vocab=vocab, keys_per_query=keys,
        score_fp32_only=kernel == "cudnn", mask_elements=0 if kernel == "cudnn" else int(tokens * keys),
        act_bytes=DTYPE_BYTES[config.runtime.dtype], moe_topk=t.num_experts_per_tok, moe_inter=moe_inter,
        num_experts=t.num_experts, tensor=sizes.get("tensor", 1),
        logit_tokens=rows * min(logits_chunk, length) if logits_chunk > 0 else tokens,
    )


def estimate_memory(config: Qwen3VLConfig, mesh: MeshConfig, batch: int, seq: int, *,
                    freeze: tuple[str, ...] = ("visual",), optim: OptimizerSettings = OptimizerSettings(),
                    rules: Rules = DEFAULT_RULES, backend: Backend = "gpu", recompute: Recompute | None = None,
                    num_devices: int | None = None, logits_chunk: int = 0) -> MemoryEstimate:
    """Per-device memory of one `Learner` step on text-only batches of `batch` rows × `seq` tokens.

    `recompute` defaults to "eager" on cpu (XLA:CPU hoists rematerialisation) and "lazy" elsewhere.
    `num_devices` resolves a -1 mesh axis; without it every axis must be given.
    """
    if num_devices is None:
        if any(getattr(mesh, a) == -1 for a in MESH_AXES):
            raise ValueError(f"mesh {mesh} has a -1 axis; give num_devices to resolve it")
        num_devices = math.prod(getattr(mesh, a) for a in MESH_AXES)
    sizes = mesh.sizes(num_devices)
    recompute = recompute or ("eager" if backend == "cpu" else "lazy")
    kernel = resolve_kernel(config.runtime.attention_impl, backend, config.runtime.dtype)
    state: StateBytes = state_bytes(config, tuple(sorted(sizes.items())), tuple(freeze), optim, tuple(rules))
    d = local_dims(config, sizes, batch, seq, kernel, rules, logits_chunk)
    cast = DTYPE_BYTES[config.runtime.dtype] / DTYPE_BYTES[config.runtime.param_dtype]
    gathered = {kind: b * cast for kind, b in state.gathered_layer.items()}
    t = config.text
    layers = range(t.num_hidden_layers)
    policies = [config.runtime.remat_for_layer(i, t.num_hidden_layers) for i in layers]
    acts = activation_bytes(policies, [t.is_moe_layer(i) for i in layers], d, gathered,
                            state.gathered_vocab_table * cast, recompute)
    return MemoryEstimate(
        params=state.trainable, frozen=state.frozen, optimizer=state.optimizer, grads=state.trainable,
        activations=acts, trainable_count=state.trainable_count, frozen_count=state.frozen_count,
        tokens_per_device=d.tokens, recompute=recompute, attention_kernel=kernel,
    )
