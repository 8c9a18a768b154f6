"""Accelerator-only checks: cuDNN flash attention and bf16 forward on GPU (skipped on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsjax.models.qwen3_vl.attention import attend, causal_mask

pytestmark = pytest.mark.gpu


def test_cudnn_causal_attention_matches_xla():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (2, 512, 8, 128), jnp.bfloat16)
    k = jax.random.normal(keys[1], (2, 512, 2, 128), jnp.bfloat16)
    v = jax.random.normal(keys[2], (2, 512, 2, 128), jnp.bfloat16)
    valid = jnp.arange(512)[None, :] < jnp.array([[512], [300]])  # right padding
    mask = causal_mask(valid)
    fast = attend(q, k, v, mask, impl="cudnn").astype(jnp.float32)
    ref = attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, impl="xla")
    rows = np.asarray(valid)
    assert np.abs(np.asarray(fast - ref))[rows].max() < 3e-2
