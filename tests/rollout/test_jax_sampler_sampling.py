"""Pure sampling math: filters against HF's logits warpers, sampling frequencies, logprobs, key streams."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsjax.rollout.engine import SamplingParams
from gsjax.rollout.sampling import (
    SAMPLE_BLOCK,
    batch_mode,
    chosen_logprobs,
    filter_logits,
    inverse_cdf_index,
    sample_tokens,
    seed_key_data,
)


def hf_filter(scaled: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = torch.as_tensor(scaled[None])
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores[0].numpy()


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (7, 0.5), (1, 1.0), (0, 1.0), (64, 0.999), (3, 0.3)])
def test_filter_keeps_the_same_ids_as_hf_warpers(top_k, top_p):
    scaled = np.random.default_rng(top_k).normal(0, 2, 64).astype(np.float32)
    ours = np.asarray(filter_logits(jnp.asarray(scaled), jnp.int32(top_k), jnp.float32(top_p)))
    theirs = hf_filter(scaled, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    np.testing.assert_array_equal(ours[np.isfinite(ours)], scaled[np.isfinite(ours)])


def _draw(logits: np.ndarray, rows: int, temperature: float, top_k: int, top_p: float, mode: str):
    batch = np.broadcast_to(logits, (rows, logits.size))
    keys = np.stack([seed_key_data(i) for i in range(rows)])
    full = lambda v, dt: jnp.full((rows,), v, dt)  # noqa: E731
    return sample_tokens(jnp.asarray(batch), jnp.asarray(keys), jnp.zeros((rows,), jnp.int32),
                         full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32), mode)


def test_sampling_frequencies_follow_the_filtered_softmax():
    logits = np.array([2.0, 1.0, 0.5, -1.0, -3.0], np.float32)
    rows = 4000
    tokens, logprobs = _draw(logits, rows, 0.7, 0, 1.0, "sample")
    expected = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    np.testing.assert_allclose(np.bincount(np.asarray(tokens), minlength=5) / rows, expected, atol=0.03)
    log_softmax = logits - np.log(np.exp(logits).sum())  # reported logprobs use the raw logits (T = 1)
    np.testing.assert_allclose(np.asarray(logprobs), log_softmax[np.asarray(tokens)], atol=1e-6)

    tokens, _ = _draw(logits, rows, 1.0, 2, 1.0, "filter")
    top2 = np.exp(logits[:2]) / np.exp(logits[:2]).sum()
    np.testing.assert_allclose(np.bincount(np.asarray(tokens), minlength=5)[:2] / rows, top2, atol=0.03)
    assert set(np.asarray(tokens).tolist()) == {0, 1}

    for mode in ("greedy", "sample", "filter"):
        greedy, _ = _draw(logits[::-1].copy(), 16, 0.0, 0, 1.0, mode)
        assert set(np.asarray(greedy).tolist()) == {4}


def test_inverse_cdf_walks_the_softmax_exactly_over_several_blocks():
    """Evenly spaced points u in [0, 1) land on each id in proportion to its probability (to the grid's
    resolution), over a vocabulary of several blocks with filtered ids (-inf) inside blocks, at block edges
    and filling whole blocks; the extreme points and a last block of padding never reach an id without mass."""
    vocab = 4 * SAMPLE_BLOCK + 77  # the last block is mostly padding
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, vocab).astype(np.float32)
    logits[SAMPLE_BLOCK:2 * SAMPLE_BLOCK] = -np.inf  # a whole block filtered out
    logits[[0, SAMPLE_BLOCK - 1, 2 * SAMPLE_BLOCK, 3 * SAMPLE_BLOCK + 5, vocab - 1]] = -np.inf
    probs = np.exp(logits - logits[np.isfinite(logits)].max())
    probs /= probs.sum()
    points = 50_000
    grid = (np.arange(points) + 0.5) / points
    extremes = np.array([0.0, np.nextafter(np.float32(1), np.float32(0))], np.float32)
    ids = np.asarray(jax.jit(jax.vmap(inverse_cdf_index, in_axes=(None, 0)))(
        jnp.asarray(logits), jnp.asarray(np.concatenate([grid, extremes]), jnp.float32)))
    assert np.isfinite(logits[ids]).all() and ids.max() < vocab
    counts = np.bincount(ids[:points], minlength=vocab) / points
    np.testing.assert_allclose(counts, probs, atol=2.0 / points)
    assert ids[-2] == np.flatnonzero(np.isfinite(logits))[0] and ids[-1] == np.flatnonzero(np.isfinite(logits))[-1]


def test_rows_sample_the_same_in_every_mode_that_covers_them():
    logits = np.random.default_rng(0).normal(0, 1, 300).astype(np.float32)
    plain, _ = _draw(logits, 64, 1.0, 0, 1.0, "sample")
    sorted_path, _ = _draw(logits, 64, 1.0, 0, 1.0, "filter")
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(sorted_path))
    assert len(set(np.asarray(plain).tolist())) > 10  # 64 different keys: many different ids


def test_batch_mode_is_the_cheapest_that_covers_every_request():
    greedy, plain, top_p = SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_p=0.9)
    assert batch_mode([greedy, SamplingParams(temperature=0.0, top_k=5)]) == "greedy"
    assert batch_mode([greedy, plain]) == "sample"
    assert batch_mode([plain, top_p]) == "filter" and batch_mode([SamplingParams(top_k=3)]) == "filter"


def test_key_streams_and_chosen_logprobs():
    assert (seed_key_data(3) == seed_key_data(3)).all() and (seed_key_data(3) != seed_key_data(4)).any()
    assert seed_key_data(2**70).shape == (2,) and (seed_key_data(None) != seed_key_data(None)).any()
    logits = jnp.asarray(np.random.default_rng(1).normal(0, 1, (3, 10)).astype(np.float32))
    tokens = jnp.asarray([0, 9, 4])
    expected = np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(chosen_logprobs(logits, tokens)), expected[[0, 1, 2], [0, 9, 4]], atol=1e-6)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (40, 1.0), (300, 0.95), (0, 0.999), (5, 0.5), (0, 1.0)])
@pytest.mark.parametrize("path", ["candidates+bisection", "candidates+sort"])
def test_fast_cutoffs_equal_the_full_sort_on_a_large_vocabulary(top_k, top_p, path, monkeypatch):
    """The top-k candidates path (with bisection, or the sort, for what it leaves open) keeps the ids the
    full sort keeps, per row, in a batch mixing a peaked row (decided among the candidates) and a flat one
    (which needs more than the candidates for top-p), and both agree with HF's warpers."""
    import gsjax.rollout.sampling as sampling

    rng = np.random.default_rng(top_k)
    rows = np.stack([rng.normal(0, 6, 5000), rng.normal(0, 0.1, 5000)]).astype(np.float32)
    k, p = jnp.full((2,), top_k, jnp.int32), jnp.full((2,), top_p, jnp.float32)
    if path == "candidates+sort":
        monkeypatch.setattr(sampling, "BISECT_STEPS", 0)  # the bracket never closes: every open row is sorted
    fast = np.asarray(sampling.filter_logits(jnp.asarray(rows), k, p))
    monkeypatch.setattr(sampling, "FILTER_CANDIDATES", 5000)  # every row decided by the full sort
    full = np.asarray(sampling.filter_logits(jnp.asarray(rows), k, p))
    np.testing.assert_array_equal(np.isfinite(fast), np.isfinite(full))
    for row in range(2):
        np.testing.assert_array_equal(np.isfinite(fast[row]), np.isfinite(hf_filter(rows[row], top_k, top_p)))


def test_bisection_finds_the_top_p_cutoff_with_ties():
    from gsjax.rollout.sampling import _bisect_top_p

    row = jnp.asarray([3.0, 1.0, 1.0, 1.0, 0.5, -2.0, 1.0, 0.5], jnp.float32)
    log_norm = jax.nn.logsumexp(row)
    probs = np.exp(np.asarray(row - log_norm))
    for top_p in (0.1, 0.4, 0.6, 0.9, 0.99):
        cutoff, exact = _bisect_top_p(row, log_norm, jnp.float32(top_p))
        above = lambda v: probs[np.asarray(row) > v].sum()  # noqa: E731
        expected = min(v for v in np.asarray(row) if above(v) < top_p)
        assert bool(exact) and float(cutoff) == expected


def test_split_buckets_cut_each_octave():
    from gsjax.rollout.slots import split_buckets

    assert split_buckets((256, 512, 1024), 2) == (256, 384, 512, 768, 1024)
    assert split_buckets((256, 512), 4) == (256, 320, 384, 448, 512)
    assert split_buckets((64, 128, 200), 1) == (64, 128, 200)
    assert split_buckets((64, 128, 136), 2) == (64, 96, 128, 136)  # no step lands on or past the next bucket
    with pytest.raises(ValueError):
        split_buckets((64, 128), 0)
