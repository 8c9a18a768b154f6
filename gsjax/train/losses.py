"""Losses as pure functions returning (sum, denominator), so that gradient accumulation and data
parallelism reproduce one big batch exactly: total = Σ sums / Σ denominators."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gsjax.models.qwen3_vl.model import LOGITS
from gsjax.parallel.sharding import constrain


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position, in fp32 (logits may be bf16)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def masked_nll(logprobs: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ masked token NLL, Σ mask): the SFT loss is their ratio, over however many micro-batches."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(-logprobs * mask), jnp.sum(mask)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return masked_nll(token_logprobs(logits, targets), mask)


def chunked_token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """`token_logprobs(hidden @ head, targets)` computed `chunk` positions at a time, each chunk rematerialised
    in the backward pass: peak memory holds one (B, chunk, V) block of logits instead of (B, L, V), which for a
    150k vocabulary is most of an 8B model's activation memory at long sequence lengths."""
    batch, length, width = hidden.shape
    pad = (-length) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    blocks = (length + pad) // chunk
    hidden_blocks = hidden.reshape(batch, blocks, chunk, width).swapaxes(0, 1)
    target_blocks = targets.reshape(batch, blocks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def block_logprobs(h: jax.Array, t: jax.Array) -> jax.Array:
        return token_logprobs(constrain(h @ head, LOGITS), t)

    out = jax.lax.map(lambda ht: block_logprobs(*ht), (hidden_blocks, target_blocks))
    return out.swapaxes(0, 1).reshape(batch, blocks * chunk)[:, :length]
