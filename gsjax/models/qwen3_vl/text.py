"""Qwen3-VL text decoder layers: GQA attention with q/k RMSNorm and M-RoPE, SwiGLU MLP, top-k MoE, and
the per-layer KV cache the attention writes into when one is given."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gsjax.parallel.sharding import constrain

from .attention import AttentionMask, attend, attend_cached
from .config import Qwen3VLConfig, TextConfig
from .layers import Dense, KeySource, RMSNorm, make_param
from .rope import apply_rotary

HEADS = ("act_batch", "act_length", "act_heads", None)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerCache:
    """Preallocated keys/values of one layer, head-major (B, K, S_max, hd), so a decode step reads each head's
    keys as one contiguous block; written at each row's own offset."""

    k: jax.Array
    v: jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RouterStats:
    """Per-layer router statistics for the load-balancing loss, summed over valid tokens."""

    top_k_counts: jax.Array  # (E,) how often each expert was selected
    prob_sums: jax.Array  # (E,) summed router probabilities
    rows: jax.Array  # () number of valid tokens


def write_cache(cache: LayerCache, k: jax.Array, v: jax.Array, offsets: jax.Array) -> LayerCache:
    """Write (B, T, K, hd) keys/values into the head-major cache at per-row offsets (B,)."""

    def put(buf, new, off):
        return jax.lax.dynamic_update_slice(buf, jnp.swapaxes(new, 0, 1).astype(buf.dtype), (0, off, 0))

    return LayerCache(k=jax.vmap(put)(cache.k, k, offsets), v=jax.vmap(put)(cache.v, v, offsets))


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, param_dtype: jnp.dtype, rngs: KeySource):
        h, n, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = make_param(rngs, (h, n, hd), ("embed", "q_heads", "head_dim"), param_dtype)
        self.k_proj = make_param(rngs, (h, kv, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = make_param(rngs, (h, kv, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = make_param(rngs, (n, hd, h), ("q_heads", "head_dim", "embed"), param_dtype)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", param_dtype, rngs)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", param_dtype, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: AttentionMask, *,
                 impl: str, chunk: int, cache: LayerCache | None = None, cache_offsets: jax.Array | None = None,
                 cache_window: int | None = None) -> tuple[jax.Array, LayerCache | None]:
        """`cache_window` (static): attend only over the cache's first slots (the mask must be as wide); a
        decode step whose longest row is short then reads a bucket of the cache instead of all of it."""
        dt = x.dtype
        q = self.q_norm(jnp.einsum("bld,dnk->blnk", x, self.q_proj[...].astype(dt)))
        k = self.k_norm(jnp.einsum("bld,dnk->blnk", x, self.k_proj[...].astype(dt)))
        v = jnp.einsum("bld,dnk->blnk", x, self.v_proj[...].astype(dt))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Named so the `save_qkv_out` remat policy keeps exactly these (and the attention output).
        q = checkpoint_name(constrain(q, HEADS), "qkv")
        k, v = checkpoint_name(constrain(k, HEADS), "qkv"), checkpoint_name(constrain(v, HEADS), "qkv")
        if cache is None:
            o = attend(q, k, v, mask, impl=impl, chunk=chunk)
        else:
            cache = write_cache(cache, k, v, cache_offsets)
            if mask.kind == "causal":  # a prefill that fills a cache of its own length: attend to what was written
                o = attend(q, k.astype(cache.k.dtype).astype(dt), v.astype(cache.v.dtype).astype(dt), mask,
                           impl=impl, chunk=chunk)
            else:
                o = attend_cached(q, cache.k[:, :, :cache_window].astype(dt),
                                  cache.v[:, :, :cache_window].astype(dt), mask, impl=impl, chunk=chunk)
        o = checkpoint_name(o, "attn_out")
        return jnp.einsum("blnk,nkd->bld", o, self.o_proj[...].astype(dt)), cache


class MLP(nnx.Module):
    def __init__(self, hidden: int, inner: int, param_dtype: jnp.dtype, rngs: KeySource):
        self.gate_proj = Dense(hidden, inner, ("embed", "mlp"), param_dtype, rngs)
        self.up_proj = Dense(hidden, inner, ("embed", "mlp"), param_dtype, rngs)
        self.down_proj = Dense(inner, hidden, ("mlp", "embed"), param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), ("act_batch", "act_length", "act_mlp"))
        return self.down_proj(hidden)


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts with always-renormalised weights (spec §3.5), no shared expert."""

    def __init__(self, cfg: TextConfig, param_dtype: jnp.dtype, rngs: KeySource, impl: str):
        h, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.top_k = cfg.num_experts_per_tok
        self.impl = impl
        self.router = make_param(rngs, (h, e), ("embed", "experts_router"), param_dtype)
        self.gate = make_param(rngs, (e, h, i), ("experts", "embed", "expert_mlp"), param_dtype)
        self.up = make_param(rngs, (e, h, i), ("experts", "embed", "expert_mlp"), param_dtype)
        self.down = make_param(rngs, (e, i, h), ("experts", "expert_mlp", "embed"), param_dtype)

    def __call__(self, x: jax.Array, token_valid: jax.Array | None) -> tuple[jax.Array, RouterStats]:
        dt = x.dtype
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = jax.nn.softmax((x @ self.router[...].astype(dt)).astype(jnp.float32), axis=-1)
        top_p, top_e = jax.lax.top_k(probs, self.top_k)
        weights = (top_p / jnp.sum(top_p, axis=-1, keepdims=True)).astype(dt)
        gate, up, down = (w[...].astype(dt) for w in (self.gate, self.up, self.down))
        if self.impl == "dense":
            per_choice = _experts_dense(x, top_e, gate, up, down)
        else:
            per_choice = _experts_ragged(x, top_e, gate, up, down)
        # each expert output times its weight in the activation dtype, summed in fp32 (HF grouped_mm)
        y = jnp.sum((per_choice * weights[..., None]).astype(jnp.float32), axis=1).astype(dt)
        valid = (jnp.ones(x.shape[0], jnp.float32) if token_valid is None
                 else token_valid.reshape(-1).astype(jnp.float32))
        counts = jnp.sum(jax.nn.one_hot(top_e, probs.shape[-1], dtype=jnp.float32) * valid[:, None, None],
                         axis=(0, 1))
        stats = RouterStats(top_k_counts=counts, prob_sums=jnp.sum(probs * valid[:, None], axis=0),
                            rows=jnp.sum(valid))
        return y.reshape(shape), stats


def _swiglu(x: jax.Array, gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(x @ gate) * (x @ up)


def _experts_dense(x, top_e, gate, up, down) -> jax.Array:
    """Reference path: every expert on every token, then pick the chosen ones; (T, k, H)."""
    all_out = jax.vmap(lambda g, u, d: _swiglu(x, g, u) @ d)(gate, up, down)  # (E, T, H)
    return jnp.take_along_axis(jnp.moveaxis(all_out, 0, 1), top_e[..., None], axis=1)


def _experts_ragged(x, top_e, gate, up, down) -> jax.Array:
    """Sort token copies by expert and run grouped matmuls (`lax.ragged_dot`); (T, k, H)."""
    tokens, k = top_e.shape
    flat = top_e.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = x[order // k]
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    ys = jax.lax.ragged_dot(h, down, sizes)
    return jnp.zeros_like(ys).at[order].set(ys).reshape(tokens, k, -1)


class DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen3VLConfig, layer: int, param_dtype: jnp.dtype, rngs: KeySource):
        cfg = config.text
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", param_dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", param_dtype, rngs)
        self.self_attn = Attention(cfg, param_dtype, rngs)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.mlp = MoE(cfg, param_dtype, rngs, config.runtime.moe_impl)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, param_dtype, rngs)
        self.attention_impl = config.runtime.attention_impl
        self.attention_chunk = config.runtime.attention_chunk

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: AttentionMask,
                 token_valid: jax.Array | None, cache: LayerCache | None, cache_offsets: jax.Array | None,
                 cache_window: int | None = None) -> tuple[jax.Array, LayerCache | None, RouterStats | None]:
        attn_out, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, impl=self.attention_impl,
                                         chunk=self.attention_chunk, cache=cache, cache_offsets=cache_offsets,
                                         cache_window=cache_window)
        x = x + attn_out
        h = self.post_attention_layernorm(x)
        stats = None
        if self.is_moe:
            mlp_out, stats = self.mlp(h, token_valid)
        else:
            mlp_out = self.mlp(h)
        return x + mlp_out, cache, stats
