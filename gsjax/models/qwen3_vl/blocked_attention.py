"""Causal attention in query blocks with a recomputing backward: the CPU training kernel.

Why its own VJP: differentiating the blocked forward made XLA keep every block's probabilities and, in the
backward, copy each block's (keys × queries) probability and score-gradient matrices into a transposed layout
for the key/value gradient dots (on the demo's SFT step, 2560 tokens, a third of the step went to those
copies). Here the forward keeps only the output and a log-sum-exp per query, and the backward recomputes each
block's scores directly in (keys, queries) layout, so every large dot reads its operands as they lie
(the demo's SFT step on 2 CPU cores: 0.98 -> 0.63 s). It saves no score matrices, but XLA:CPU's
concurrency-minded scheduler runs independent blocks side by side, so its peak memory there is the same as
the differentiated kernel's (tests/bench/test_calibration.py); under a lazy GPU/TPU schedule it holds less.

Layout inside: q (B, K, G, T, H) with the G query heads that share a KV head next to it, k and v (B, K, S, H);
queries are pre-scaled by 1/√H. Scores and softmax are fp32.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

_NEG = float(jnp.finfo(jnp.float32).min)


def _blocks(length: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, length)) for start in range(0, length, block)]


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array | None,
             block: int) -> tuple[jax.Array, jax.Array]:
    """Output (B, K, G, T, H) and log-sum-exp (B, K, G, T); query block [start, stop) reads keys [0, stop)."""
    outs, lses = [], []
    for start, stop in _blocks(q.shape[3], block):
        visible = (jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None])[None, None, None]
        if kv_valid is not None:
            visible = visible & kv_valid[:, None, None, None, :stop]
        scores = jnp.einsum("bkgth,bksh->bkgts", q[:, :, :, start:stop], k[:, :, :stop])
        scores = jnp.where(visible, scores, _NEG)
        peak = jnp.max(scores, axis=-1, keepdims=True)
        weights = jnp.exp(scores - peak)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        outs.append(jnp.einsum("bkgts,bksh->bkgth", weights, v[:, :, :stop]) / total)
        lses.append((peak + jnp.log(total))[..., 0])
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def blocked_causal(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array | None, block: int) -> jax.Array:
    """softmax(q·kᵀ, causal, keys where kv_valid)·v in the layout above (fp32 in and out).

    A query row that sees no valid key averages the keys it may not see, as the dense kernel does; such rows
    are padding, never read, and their backward is zero.
    """
    return _forward(q, k, v, kv_valid, block)[0]


Residuals = tuple[jax.Array, jax.Array, jax.Array, "jax.Array | None", jax.Array, jax.Array]


def _blocked_causal_fwd(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array | None,
                        block: int) -> tuple[jax.Array, Residuals]:
    out, lse = _forward(q, k, v, kv_valid, block)
    return out, (q, k, v, kv_valid, out, lse)


def _blocked_causal_bwd(block: int, residuals: Residuals, d_out: jax.Array) -> tuple:
    """Gradients of q, k, v (and a float0 zero for the mask), block by block from the saved lse."""
    q, k, v, kv_valid, out, lse = residuals
    batch, kv_heads, group, length, dim = q.shape
    delta = jnp.sum(d_out * out, axis=-1)  # (B, K, G, T): rowsum(dP·P) of the softmax backward
    k_by_dim = jnp.swapaxes(k, 2, 3)  # (B, K, H, S), small: lets dq's dot read the scores as laid out
    d_q_blocks, d_k, d_v = [], jnp.zeros_like(k), jnp.zeros_like(v)

    def columns(x: jax.Array, start: int, stop: int) -> jax.Array:
        """(B, K, G, T, ...) rows [start, stop) as (B, K, G·t, ...): one query column per head and row."""
        return x[:, :, :, start:stop].reshape(batch, kv_heads, group * (stop - start), *x.shape[4:])

    for start, stop in _blocks(length, block):
        q_cols, d_out_cols = columns(q, start, stop), columns(d_out, start, stop)
        visible = jnp.tile(jnp.arange(stop)[:, None] <= jnp.arange(start, stop)[None, :], (1, group))[None, None]
        if kv_valid is not None:
            visible = visible & kv_valid[:, None, :stop, None]  # (B, 1, S, G·t)
        scores = jnp.einsum("bksh,bkxh->bksx", k[:, :, :stop], q_cols)  # (B, K, S, G·t)
        probs = jnp.where(visible, jnp.exp(scores - columns(lse, start, stop)[:, :, None]), 0.0)
        d_probs = jnp.einsum("bksh,bkxh->bksx", v[:, :, :stop], d_out_cols)
        d_scores = probs * (d_probs - columns(delta, start, stop)[:, :, None])
        d_q = jnp.einsum("bkhs,bksx->bkhx", k_by_dim[:, :, :, :stop], d_scores)
        d_q_blocks.append(jnp.swapaxes(d_q, 2, 3).reshape(batch, kv_heads, group, stop - start, dim))
        d_k = d_k.at[:, :, :stop].add(jnp.einsum("bksx,bkxh->bksh", d_scores, q_cols))
        d_v = d_v.at[:, :, :stop].add(jnp.einsum("bksx,bkxh->bksh", probs, d_out_cols))
    d_valid = None if kv_valid is None else jnp.zeros(kv_valid.shape, jax.dtypes.float0)
    return jnp.concatenate(d_q_blocks, axis=3), d_k, d_v, d_valid


blocked_causal.defvjp(_blocked_causal_fwd, _blocked_causal_bwd)
