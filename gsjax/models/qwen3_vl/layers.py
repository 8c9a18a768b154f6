"""Building blocks shared by the vision tower and the text decoder: parameters with logical axes,
norms with fp32 statistics, and dtype handling.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")) so that the parallel layer maps
it to mesh axes by rules kept in config; no sharding decision lives in the model code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

DTYPE_BY_NAME = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
    return DTYPE_BY_NAME[name]


def normal_init(stddev: float = 0.02) -> Initializer:
    return lambda key, shape, dtype: stddev * jax.random.normal(key, shape, jnp.float32).astype(dtype)


def zeros_init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    return jnp.zeros(shape, dtype)


def ones_init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    return jnp.ones(shape, dtype)


class ParamKeys:
    """Keys for parameter initialisers: the base key folded with a draw count kept in Python.

    nnx.Rngs counts its draws in a Variable. Under tracing (eval_shape for abstract state, a jitted sharded
    init) each count update makes flax ask a tracer for its sharding, and jax builds that error message by
    walking every equation traced so far: one key per parameter cost O(parameters²), 12 s to trace the 8B
    preset's shapes and 15 s for 30B-A3B. A Python counter costs nothing and draws the same kind of keys.
    """

    def __init__(self, base: jax.Array):
        self._base = base
        self._drawn = 0

    @classmethod
    def of(cls, source: KeySource) -> ParamKeys:
        return source if isinstance(source, ParamKeys) else cls(source.params())

    def __call__(self) -> jax.Array:
        key = jax.random.fold_in(self._base, self._drawn)
        self._drawn += 1
        return key


KeySource = nnx.Rngs | ParamKeys  # modules built on their own (tests) may still take an nnx.Rngs


def make_param(rngs: KeySource, shape: Sequence[int], axes: Sequence[str | None], dtype: jnp.dtype,
               init: Initializer = normal_init()) -> nnx.Param:
    """A parameter with its logical axis names; the names must match the rank."""
    if len(shape) != len(axes):
        raise ValueError(f"parameter of shape {tuple(shape)} given {len(axes)} logical axes {tuple(axes)}")
    key = rngs() if isinstance(rngs, ParamKeys) else rngs.params()
    return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF Qwen3 RMSNorm: statistics in fp32, cast back to the input dtype, then times the weight."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """Two-pass LayerNorm in fp32 (one-pass variance loses ~1e-6 parity), result in the input dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centred = xf - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str, param_dtype: jnp.dtype, rngs: KeySource):
        self.eps = eps
        self.scale = make_param(rngs, (dim,), (axis_name,), param_dtype, ones_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str, param_dtype: jnp.dtype, rngs: KeySource):
        self.eps = eps
        self.scale = make_param(rngs, (dim,), (axis_name,), param_dtype, ones_init)
        self.bias = make_param(rngs, (dim,), (axis_name,), param_dtype, zeros_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Dense(nnx.Module):
    """x @ kernel (+ bias) over the last input axis, computed in the activation dtype."""

    def __init__(self, in_dim: int, out_dim: int, axes: tuple[str, str], param_dtype: jnp.dtype,
                 rngs: KeySource, use_bias: bool = False):
        self.kernel = make_param(rngs, (in_dim, out_dim), axes, param_dtype)
        self.bias = make_param(rngs, (out_dim,), (axes[1],), param_dtype, zeros_init) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


def remat_policy(name: str):
    """Map a config name to a jax.checkpoint policy; None means no rematerialisation."""
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        "save_qkv_out": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
    }
    if name == "none":
        return None
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; choose from {['none', *policies]}")
    return policies[name]
