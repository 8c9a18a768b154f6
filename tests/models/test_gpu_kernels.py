"""Accelerator-only checks: cuDNN flash attention against the XLA kernel on GPU (skipped on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsjax.models.qwen3_vl.attention import attend, causal_mask

pytestmark = pytest.mark.gpu

LENGTHS = (512, 300, 0)  # full, right-padded, fully padded


def _inputs() -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (3, 512, 8, 128), jnp.bfloat16)
    k = jax.random.normal(keys[1], (3, 512, 2, 128), jnp.bfloat16)
    v = jax.random.normal(keys[2], (3, 512, 2, 128), jnp.bfloat16)
    valid = jnp.arange(512)[None, :] < jnp.array(LENGTHS)[:, None]
    return q, k, v, valid


def test_cudnn_causal_attention_matches_xla_forward_and_backward():
    q, k, v, valid = _inputs()
    mask = causal_mask(valid)
    rows = np.asarray(valid)[:, :, None, None]

    def loss(impl: str, dtype):
        def f(q, k, v):
            out = attend(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, impl=impl).astype(jnp.float32)
            return jnp.sum(jnp.where(rows, out, 0.0) ** 2), out
        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, fast), fast_grads = loss("cudnn", jnp.bfloat16)
    (_, ref), ref_grads = loss("xla", jnp.float32)
    assert np.isfinite(np.asarray(fast)).all()  # the fully padded row too
    assert np.abs(np.where(rows, np.asarray(fast - ref), 0)).max() < 3e-2
    for got, want in zip(fast_grads, ref_grads, strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.isfinite(got).all()
        assert np.abs(got - want).max() < 5e-2 * max(1.0, np.abs(want).max())


def test_cudnn_causal_attention_poisons_a_mask_that_is_not_right_padding():
    q, k, v, valid = _inputs()
    holes = valid.at[0, 10].set(False)  # row 0 now has a hole: not expressible as a length
    out = np.asarray(attend(q, k, v, causal_mask(holes), impl="cudnn"), np.float32)
    assert np.isnan(out[0]).all()
    assert np.isfinite(out[1:]).all()
