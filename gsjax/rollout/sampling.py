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


FILTER_CANDIDATES = 256
"""Top-k/top-p cutoffs are found among each row's largest logits (`lax.top_k`, ~100x cheaper on a CPU than
sorting a 150k vocabulary). A flat distribution (an untrained or uncertain policy) can need more than that
for top-p: then the cutoff is bisected over the row's values, and only what neither decides is sorted."""
BISECT_STEPS = 48


def _cutoff(ordered: jax.Array, log_norm: jax.Array, top_k: jax.Array, top_p: jax.Array,
            vocab: int) -> tuple[jax.Array, jax.Array]:
    """(cutoff, exact) of one row from `ordered`, its largest values in descending order (all V of them,
    or a prefix). `log_norm`: logsumexp of the whole row, used when there is no top-k. Kept: every value
    >= cutoff. `exact` is False when the prefix is too short to decide."""
    size = ordered.shape[0]
    ranks = jnp.arange(size)
    in_top_k = ranks < jnp.where(top_k > 0, top_k, vocab)
    masked = jnp.where(in_top_k, ordered, -jnp.inf)
    log_norm = jnp.where(top_k > 0, jax.nn.logsumexp(masked), log_norm)
    probs = jnp.exp(masked - log_norm)
    mass = jnp.cumsum(probs)
    n_top_p = jnp.sum(in_top_k & (mass - probs < top_p))
    n_keep = jnp.where(top_p < 1, n_top_p, jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab))
    cutoff = ordered[jnp.clip(n_keep - 1, 0, size - 1)]
    no_filter = (top_k <= 0) & (top_p >= 1)
    decided_k = (top_k > 0) & (jnp.minimum(top_k, vocab) <= size)
    decided_p = (top_k <= 0) & (top_p < 1) & ((n_top_p < size) | (mass[-1] >= top_p) | (size == vocab))
    return jnp.where(no_filter, -jnp.inf, cutoff), no_filter | decided_k | decided_p


def _bisect_top_p(row: jax.Array, log_norm: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cutoff, exact) of top-p alone on one row without sorting: the smallest row value v whose strictly
    larger values hold less than `top_p` of the mass (so v is kept, as in the sorted rule). That mass only
    falls as a threshold rises, so bisection between min and max brackets v in (lo, hi]; it is exact when
    the bracket ends up holding a single distinct value."""
    probs = jnp.exp(row - log_norm)

    def step(_: int, bracket: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bracket
        mid = lo + (hi - lo) / 2
        keeps_mid = jnp.sum(jnp.where(row > mid, probs, 0.0)) < top_p
        return jnp.where(keeps_mid, lo, mid), jnp.where(keeps_mid, mid, hi)

    lo, hi = jax.lax.fori_loop(0, BISECT_STEPS, step, (jnp.min(row) - 1.0, jnp.max(row)))
    inside = (row > lo) & (row <= hi)
    cutoff = jnp.min(jnp.where(inside, row, jnp.inf))
    return cutoff, cutoff == jnp.max(jnp.where(inside, row, -jnp.inf))


def filter_logits(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature-scaled logits (B, V) (or one row (V,)) with everything outside each row's top-k, then
    top-p, set to -inf; top_k (B,), top_p (B,).

    Order and tie handling follow HF's warpers (top-k keeps ties with the k-th value; top-p keeps the
    most probable ids until their mass reaches top_p, at least one). top_k <= 0 and top_p >= 1 are
    exact no-ops, so a row that asks for no filtering samples the same whichever path the batch takes.
    """
    if scaled.ndim == 1:
        return filter_logits(scaled[None], jnp.reshape(top_k, (1,)), jnp.reshape(top_p, (1,)))[0]
    vocab = scaled.shape[-1]
    log_norm = jax.nn.logsumexp(scaled, axis=-1)
    cutoff_of = jax.vmap(lambda o, n, k, p: _cutoff(o, n, k, p, vocab))
    head = jax.lax.top_k(scaled, min(FILTER_CANDIDATES, vocab))[0]
    cutoff, exact = cutoff_of(head, log_norm, top_k, top_p)

    def sorted_cutoffs() -> jax.Array:
        return cutoff_of(-jnp.sort(-scaled, axis=-1), log_norm, top_k, top_p)[0]

    def bisected_cutoffs() -> jax.Array:
        bisected, found = jax.vmap(_bisect_top_p)(scaled, log_norm, top_p)
        use = ~exact & (top_k <= 0) & (top_p < 1) & found
        merged = jnp.where(use, bisected, cutoff)
        return jax.lax.cond(jnp.all(exact | use), lambda: merged, sorted_cutoffs)

    cutoff = jax.lax.cond(jnp.all(exact), lambda: cutoff, bisected_cutoffs)
    return jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)


SAMPLE_BLOCK = 512
"""Inverse-CDF draws walk the vocabulary in blocks of this many ids: block sums pick the block, one block's
cumulative sum picks the id (two short scans instead of one over 150k ids)."""


def inverse_cdf_index(scaled: jax.Array, u: jax.Array) -> jax.Array:
    """The id whose slice of softmax(`scaled`) (V,) holds the fraction `u` in [0, 1) of the row's mass.

    One uniform number per row instead of `jax.random.categorical`'s Gumbel noise over the whole
    vocabulary: on a CPU the 150k random numbers per row and step cost about 25 times this whole draw. Ids
    at -inf (filtered out) have no mass and are never chosen: a point past the last block's or id's mass
    (rounding) is moved back onto the last one that has some.
    """
    vocab = scaled.shape[-1]
    block = min(SAMPLE_BLOCK, vocab)
    probs = jnp.exp(scaled - jnp.max(scaled))
    probs = jnp.pad(probs, (0, -vocab % block)).reshape(-1, block)

    def pick(cumulative: jax.Array, point: jax.Array) -> jax.Array:
        """First index whose cumulative mass exceeds `point`, kept inside [0, total)."""
        point = jnp.clip(point, 0.0, jnp.nextafter(cumulative[-1], jnp.float32(0)))
        return jnp.sum(cumulative <= point).astype(jnp.int32)

    block_mass = probs.sum(axis=-1)
    block_cdf = jnp.cumsum(block_mass)
    point = u * block_cdf[-1]
    b = pick(block_cdf, point)
    within = pick(jnp.cumsum(probs[b]), point - (block_cdf[b] - block_mass[b]))
    return b * block + within


def _sample_row(logits: jax.Array, scaled: jax.Array, key_data: jax.Array, index: jax.Array,
                temperature: jax.Array, mode: Mode) -> jax.Array:
    """One row's token: argmax when greedy, else a draw from `scaled` (the logits at the row's temperature,
    filtered in "filter" mode); the draw depends only on this row's key and index."""
    greedy = temperature <= 0
    if mode == "greedy":
        return jnp.argmax(logits).astype(jnp.int32)
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=KEY_IMPL), index)
    sampled = inverse_cdf_index(scaled, jax.random.uniform(key, (), jnp.float32))
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
    scaled = logits / jnp.where(temperature <= 0, 1.0, temperature)[:, None]
    if mode == "filter":  # filtered per batch (one top-k call); each row's draw then uses its own key only
        scaled = filter_logits(scaled, top_k, top_p)
    row = jax.vmap(lambda *a: _sample_row(*a, mode=mode))
    tokens = row(logits, scaled, key_data, index, temperature)
    return tokens, chosen_logprobs(logits, tokens)
