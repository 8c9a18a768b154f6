"""Losses as pure functions returning (sum, denominator), so that gradient accumulation and data
parallelism reproduce one big batch exactly: total = Σ sums / Σ denominators."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position, in fp32 (logits may be bf16)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ masked token NLL, Σ mask): the SFT loss is their ratio, over however many micro-batches."""
    mask = mask.astype(jnp.float32)
    nll = -token_logprobs(logits, targets)
    return jnp.sum(nll * mask), jnp.sum(mask)
