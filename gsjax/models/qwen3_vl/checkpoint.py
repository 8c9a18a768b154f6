"""HF safetensors ⇄ gsjax parameters, both ways, tensor by tensor (spec/qwen3vl.md §4).

Each `Rule` ties one HF tensor to one or more gsjax parameters with a pair of pure, bit-exact
transforms (transpose / reshape / split / concat). Loading reads memory-mapped tensors one at a time and
hands each converted array to a `place` callback (default: a device array of the chosen dtype; the
sharded learner passes one that builds each device's slice only). Exporting writes the hub layout.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from gsjax.errors import InputError

from ..safetensors_io import INDEX_NAME, SINGLE_NAME, CheckpointReader, shard_plan, write_safetensors
from .config import Qwen3VLConfig, RuntimeConfig
from .layers import dtype_of
from .model import Qwen3VL

Arrays = tuple[np.ndarray, ...]
ExpertLayout = Literal["hub", "v5"]
Place = Callable[[str, np.ndarray, jnp.dtype], jax.Array]

VISION = "model.visual."
TEXT = "model.language_model."
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}


class CheckpointError(InputError, ValueError):
    """A checkpoint directory with a missing, unexpected or wrongly shaped tensor; the message names the key.
    (A conversion rule that does not fit the model is a bug here, a RuntimeError.)"""


@dataclass(frozen=True)
class Rule:
    hf_key: str
    hf_shape: tuple[int, ...]
    paths: tuple[str, ...]  # dotted gsjax parameter paths
    to_jax: Callable[[np.ndarray], Arrays]
    to_hf: Callable[[Arrays], np.ndarray]


# ---------------------------------------------------------------- transforms
def _copy() -> tuple[Callable, Callable]:
    return (lambda w: (w,)), (lambda ws: ws[0])


def _transpose() -> tuple[Callable, Callable]:
    return (lambda w: (w.T,)), (lambda ws: ws[0].T)


def _linear_to_heads(heads: int, head_dim: int) -> tuple[Callable, Callable]:
    """(heads·hd, in) Linear weight ⇄ (in, heads, hd) kernel."""
    return ((lambda w: (w.T.reshape(w.shape[1], heads, head_dim),)),
            (lambda ws: ws[0].reshape(ws[0].shape[0], heads * head_dim).T))


def _linear_from_heads(heads: int, head_dim: int) -> tuple[Callable, Callable]:
    """(out, heads·hd) Linear weight ⇄ (heads, hd, out) kernel."""
    return ((lambda w: (w.T.reshape(heads, head_dim, w.shape[0]),)),
            (lambda ws: ws[0].reshape(heads * head_dim, ws[0].shape[-1]).T))


def _rule(hf_key: str, hf_shape: tuple[int, ...], paths: str | tuple[str, ...],
          fns: tuple[Callable, Callable]) -> Rule:
    return Rule(hf_key, tuple(hf_shape), (paths,) if isinstance(paths, str) else paths, fns[0], fns[1])


# ---------------------------------------------------------------- rules
def _vision_rules(config: Qwen3VLConfig) -> Iterator[Rule]:
    v, hidden = config.vision, config.text.hidden_size
    d, nh, hd, i_v, d4 = v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size, v.hidden_size * v.merge_unit
    kernel_shape = (d, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    yield _rule(VISION + "patch_embed.proj.weight", kernel_shape, "visual.patch_embed.kernel",
                ((lambda w: (w.reshape(d, -1).T,)), (lambda ws: ws[0].T.reshape(kernel_shape))))
    yield _rule(VISION + "patch_embed.proj.bias", (d,), "visual.patch_embed.bias", _copy())
    yield _rule(VISION + "pos_embed.weight", (v.num_position_embeddings, d), "visual.pos_embed", _copy())
    for b in range(v.depth):
        hf, gs = f"{VISION}blocks.{b}.", f"visual.blocks.{b}."
        for norm in ("norm1", "norm2"):
            yield _rule(hf + f"{norm}.weight", (d,), gs + f"{norm}.scale", _copy())
            yield _rule(hf + f"{norm}.bias", (d,), gs + f"{norm}.bias", _copy())
        yield _rule(hf + "attn.qkv.weight", (3 * d, d), tuple(gs + f"{n}_proj" for n in "qkv"),
                    ((lambda w: tuple(p.reshape(d, nh, hd) for p in np.split(w.T, 3, axis=1))),
                     (lambda ws: np.concatenate([w.reshape(d, d) for w in ws], axis=1).T)))
        yield _rule(hf + "attn.qkv.bias", (3 * d,), tuple(gs + f"{n}_bias" for n in "qkv"),
                    ((lambda w: tuple(p.reshape(nh, hd) for p in np.split(w, 3))),
                     (lambda ws: np.concatenate([w.reshape(d) for w in ws]))))
        yield _rule(hf + "attn.proj.weight", (d, d), gs + "o_proj", _linear_from_heads(nh, hd))
        yield _rule(hf + "attn.proj.bias", (d,), gs + "o_bias", _copy())
        for hf_name, gs_name, shape in (("linear_fc1", "fc1", (i_v, d)), ("linear_fc2", "fc2", (d, i_v))):
            yield _rule(hf + f"mlp.{hf_name}.weight", shape, gs + f"{gs_name}.kernel", _transpose())
            yield _rule(hf + f"mlp.{hf_name}.bias", (shape[0],), gs + f"{gs_name}.bias", _copy())
    mergers = [("merger.", "visual.merger.", d)] + [
        (f"deepstack_merger_list.{k}.", f"visual.deepstack_mergers.{k}.", d4)
        for k in range(len(v.deepstack_visual_indexes))]
    for hf_prefix, gs, norm_dim in mergers:
        hf = VISION + hf_prefix
        yield _rule(hf + "norm.weight", (norm_dim,), gs + "norm.scale", _copy())
        yield _rule(hf + "norm.bias", (norm_dim,), gs + "norm.bias", _copy())
        yield _rule(hf + "linear_fc1.weight", (d4, d4), gs + "fc1.kernel", _transpose())
        yield _rule(hf + "linear_fc1.bias", (d4,), gs + "fc1.bias", _copy())
        yield _rule(hf + "linear_fc2.weight", (hidden, d4), gs + "fc2.kernel", _transpose())
        yield _rule(hf + "linear_fc2.bias", (hidden,), gs + "fc2.bias", _copy())


def _moe_rules(config: Qwen3VLConfig, layer: int, layout: ExpertLayout) -> Iterator[Rule]:
    t = config.text
    h, e, i = t.hidden_size, t.num_experts, t.moe_intermediate_size
    hf, gs = f"{TEXT}layers.{layer}.mlp.", f"layers.{layer}.mlp."
    yield _rule(hf + "gate.weight", (e, h), gs + "router", _transpose())
    swap = (lambda w: w.transpose(0, 2, 1))  # 5.x keeps experts transposed in memory (spec §4)
    pre = swap if layout == "v5" else (lambda w: w)
    gate_up_shape = (e, 2 * i, h) if layout == "v5" else (e, h, 2 * i)
    yield _rule(hf + "experts.gate_up_proj", gate_up_shape, (gs + "gate", gs + "up"),
                ((lambda w: tuple(np.split(pre(w), 2, axis=-1))),
                 (lambda ws: pre(np.concatenate(ws, axis=-1)))))
    down_shape = (e, h, i) if layout == "v5" else (e, i, h)
    yield _rule(hf + "experts.down_proj", down_shape, gs + "down", ((lambda w: (pre(w),)), (lambda ws: pre(ws[0]))))


def _text_rules(config: Qwen3VLConfig, layout: ExpertLayout) -> Iterator[Rule]:
    t = config.text
    h, n, kv, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    yield _rule(TEXT + "embed_tokens.weight", (t.vocab_size, h), "embed_tokens", _copy())
    yield _rule(TEXT + "norm.weight", (h,), "norm.scale", _copy())
    if not config.tie_word_embeddings:
        yield _rule("lm_head.weight", (t.vocab_size, h), "lm_head", _transpose())
    for layer in range(t.num_hidden_layers):
        hf, gs = f"{TEXT}layers.{layer}.", f"layers.{layer}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield _rule(hf + f"{norm}.weight", (h,), gs + f"{norm}.scale", _copy())
        attn, gattn = hf + "self_attn.", gs + "self_attn."
        yield _rule(attn + "q_proj.weight", (n * hd, h), gattn + "q_proj", _linear_to_heads(n, hd))
        yield _rule(attn + "k_proj.weight", (kv * hd, h), gattn + "k_proj", _linear_to_heads(kv, hd))
        yield _rule(attn + "v_proj.weight", (kv * hd, h), gattn + "v_proj", _linear_to_heads(kv, hd))
        yield _rule(attn + "o_proj.weight", (h, n * hd), gattn + "o_proj", _linear_from_heads(n, hd))
        yield _rule(attn + "q_norm.weight", (hd,), gattn + "q_norm.scale", _copy())
        yield _rule(attn + "k_norm.weight", (hd,), gattn + "k_norm.scale", _copy())
        if t.is_moe_layer(layer):
            yield from _moe_rules(config, layer, layout)
        else:
            for proj, shape in (("gate_proj", (t.intermediate_size, h)), ("up_proj", (t.intermediate_size, h)),
                                ("down_proj", (h, t.intermediate_size))):
                yield _rule(hf + f"mlp.{proj}.weight", shape, gs + f"mlp.{proj}.kernel", _transpose())


def hf_rules(config: Qwen3VLConfig, expert_layout: ExpertLayout = "hub") -> list[Rule]:
    return [*_vision_rules(config), *_text_rules(config, expert_layout)]


def detect_expert_layout(config: Qwen3VLConfig, reader: CheckpointReader) -> ExpertLayout:
    """Hub (E,H,2I) vs transformers-5.x (E,2I,H) expert layout, by shape; refuse the ambiguous H == 2I."""
    t = config.text
    layer = next((i for i in range(t.num_hidden_layers) if t.is_moe_layer(i)), None)
    if layer is None:
        return "hub"
    key = f"{TEXT}layers.{layer}.mlp.experts.gate_up_proj"
    if key not in reader:
        raise CheckpointError(f"missing tensor {key!r}")
    h, i2 = t.hidden_size, 2 * t.moe_intermediate_size
    if h == i2 or h == t.moe_intermediate_size:
        raise CheckpointError(
            f"{key}: hidden_size={h} equals 2·moe_intermediate_size or moe_intermediate_size, so the hub and "
            f"transformers-5.x expert layouts cannot be told apart by shape")
    shape = reader.shape(key)
    if shape[1:] == (h, i2):
        return "hub"
    if shape[1:] == (i2, h):
        return "v5"
    raise CheckpointError(f"{key} has shape {shape}; expected (E, {h}, {i2}) or (E, {i2}, {h})")


# ---------------------------------------------------------------- load
def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def default_place(path: str, array: np.ndarray, dtype: jnp.dtype) -> jax.Array:
    return jnp.asarray(np.asarray(array).astype(dtype))


_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


def load_hf(directory: str | Path, runtime: RuntimeConfig | None = None, place: Place = default_place,
            config: Qwen3VLConfig | None = None) -> Qwen3VL:
    """Build a Qwen3VL from an HF checkpoint directory without torch, one memory-mapped tensor at a time."""
    directory = Path(directory)
    config = config or Qwen3VLConfig.from_file(directory, runtime)
    reader = CheckpointReader(directory)
    rules = hf_rules(config, detect_expert_layout(config, reader))
    abstract = nnx.eval_shape(lambda: Qwen3VL(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = {_dotted(p): v for p, v in nnx.to_flat_state(state)}
    _check_keys(reader, rules, config, directory)
    dtype = dtype_of(config.runtime.param_dtype)
    values: dict[str, jax.Array] = {}
    for rule in rules:
        found = reader.shape(rule.hf_key)
        if found != rule.hf_shape:
            raise CheckpointError(f"{directory}: tensor {rule.hf_key!r} has shape {found}, expected {rule.hf_shape}")
        for path, array in zip(rule.paths, rule.to_jax(reader.get(rule.hf_key))):
            if path not in expected:
                raise RuntimeError(f"internal: rule for {rule.hf_key!r} targets unknown parameter {path!r}")
            if array.shape != expected[path].shape:
                raise RuntimeError(f"internal: {rule.hf_key!r} converts to {array.shape} for {path!r}, "
                                   f"expected {expected[path].shape}")
            values[path] = place(path, array, dtype)
    missing = sorted(set(expected) - set(values))
    if missing:
        raise RuntimeError(f"internal: no checkpoint rule fills parameters {missing[:5]}")
    flat = [(p, v.replace(values[_dotted(p)])) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_keys(reader: CheckpointReader, rules: list[Rule], config: Qwen3VLConfig, directory: Path) -> None:
    wanted = {r.hf_key for r in rules}
    present = set(reader.keys())
    missing = sorted(wanted - present)
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {missing[:8]}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(k for k in present - wanted - tolerated if not k.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor(s) {unexpected[:8]}"
                              + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))


# ---------------------------------------------------------------- export
def _host(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def hf_tensors(model: Qwen3VL, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, array) in hub layout, one at a time, cast to `dtype` (default: the param dtype)."""
    config: Qwen3VLConfig = model.config
    np_dtype = NP_DTYPES[dtype or config.runtime.param_dtype]
    state = {_dotted(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for rule in hf_rules(config, "hub"):
        arrays = tuple(_host(state[p][...]) for p in rule.paths)
        yield rule.hf_key, np.ascontiguousarray(rule.to_hf(arrays).astype(np_dtype))


def export_hf(model: Qwen3VL, directory: str | Path, dtype: str | None = None,
              max_shard_bytes: int = 5 * 2**30, extra_files: dict[str, str] | None = None) -> Path:
    """Write an HF checkpoint directory (config.json + safetensors, sharded with an index when large).

    Written into a temporary sibling directory then renamed into place, so readers (transformers,
    SGLang weight sync) never see a partial checkpoint.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    config: Qwen3VLConfig = model.config
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tensors = dict(hf_tensors(model, dtype))
        sizes = {k: v.nbytes for k, v in tensors.items()}
        shards = list(shard_plan(sizes, max_shard_bytes))
        names = ([SINGLE_NAME] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, keys in zip(names, shards):
            write_safetensors(tmp / name, {k: tensors[k] for k in keys}, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        hf_config = config.to_hf_dict()
        hf_config["dtype"] = dtype or config.runtime.param_dtype
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _replace_dir(src: Path, dst: Path) -> None:
    """Move src to dst; an existing dst is moved aside first and removed only after the swap."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
