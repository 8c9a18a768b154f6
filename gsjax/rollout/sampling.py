"""Pure sampling math for one decode step: per-row temperature / top-k / top-p, per-request RNG streams.

Every row is sampled from its own key, `fold_in(request key, token index)`, and the filters act on that
row alone, so a request's tokens do not depend on which other requests share the batch, on its slot, or
on when it was admitted. The reported logprob is log-softmax of the raw logits (temperature 1, before
any filtering) at the chosen id: what the trainer recomputes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from .engine import SamplingParams

KEY_IMPL = "threefry2x32"  # key data (2,) uint32 per request, built on the host from the request seed
# What a batch needs, cheapest first: argmax only; + random draws; + the sort for top-k/top-p. A row gets the
# same token in every mode that covers it, so the mode is a compile-time choice of the batch, not of the row.
Mode = Literal["greedy", "sample", "filter"]


def seed_key_data(seed: int | None) -> np.ndarray:
    """(2,) uint32 key data for a request: a hash of `seed` (any int), or fresh entropy when it is None."""
    return np.random.SeedSequence(seed).generate_state(2, np.uint32)


def chosen_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(logits)[token] per row, in fp32; logits (B, V), tokens (B,)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def filter_logits(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """One row's (V,) temperature-scaled logits with everything outside top-k, then top-p, set to -inf.

    Order and tie handling follow HF's warpers (top-k keeps ties with the k-th value; top-p keeps the
    most probable ids until their mass reaches top_p, at least one). top_k <= 0 and top_p >= 1 are
    exact no-ops, so a row that asks for no filtering samples the same whichever path the batch takes.
    """
    vocab = scaled.shape[-1]
    ordered = jnp.sort(scaled)[::-1]
    n_keep = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranks = jnp.arange(vocab)
    in_top_k = ranks < n_keep
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf))
    mass_before = jnp.cumsum(probs) - probs
    n_keep = jnp.where(top_p < 1, jnp.sum(in_top_k & (mass_before < top_p)), n_keep)
    cutoff = ordered[jnp.maximum(n_keep - 1, 0)]
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def _sample_row(logits: jax.Array, key_data: jax.Array, index: jax.Array, temperature: jax.Array,
                top_k: jax.Array, top_p: jax.Array, mode: Mode) -> jax.Array:
    greedy = temperature <= 0
    if mode == "greedy":
        return jnp.argmax(logits).astype(jnp.int32)
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    if mode == "filter":
        scaled = filter_logits(scaled, top_k, top_p)
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=KEY_IMPL), index)
    sampled = jax.random.categorical(key, scaled)
    return jnp.where(greedy, jnp.argmax(logits), sampled).astype(jnp.int32)


def batch_mode(params: Iterable[SamplingParams]) -> Mode:
    """The cheapest mode that samples every one of these requests as asked."""
    params = list(params)
    if all(p.greedy for p in params):
        return "greedy"
    if any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in params):
        return "filter"
    return "sample"


def sample_tokens(logits: jax.Array, key_data: jax.Array, index: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array, mode: Mode) -> tuple[jax.Array, jax.Array]:
    """Next ids (B,) int32 and their raw-logit logprobs (B,) fp32 from logits (B, V).

    key_data (B, 2) uint32 per-request keys, index (B,) the token's index in its request's output (the
    RNG stream position), temperature (B,) (0 = greedy), top_k (B,), top_p (B,). `mode` (static): "greedy"
    takes the argmax of every row, "sample" ignores top-k/top-p, "filter" applies everything.
    """
    logits = logits.astype(jnp.float32)
    row = jax.vmap(lambda *a: _sample_row(*a, mode=mode))
    tokens = row(logits, key_data, index, temperature, top_k, top_p)
    return tokens, chosen_logprobs(logits, tokens)
