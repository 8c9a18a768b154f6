"""Prefix reuse in the embedded sampler: a multi-turn request that extends a finished one is admitted into the
same slot and prefills only its new suffix, and its tokens and logprobs are those of the full forward."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest
from flax import nnx

from gsjax.rollout.engine import GenerationRequest, GenerationResult, ImageInputs, SamplingParams
from gsjax.rollout.jax_sampler import JaxSampler, SamplerConfig, SamplerStats
from gsjax.rollout.slots import RetainedPrefix, build_prefill, prepare, reusable_length

from .conftest import NEW_GRID, assert_matches_full_forward, image_request, next_turn, text_request

REUSE = SamplerConfig(max_slots=4, max_total_len=128, min_prefill_bucket=16, min_reuse_tokens=1)


def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


@pytest.fixture(scope="module")
def reuse_sampler(sampler_model):
    engine = JaxSampler(sampler_model, REUSE)
    yield engine
    engine.close()


def test_multi_turn_with_reused_prefixes_equals_full_forward(reuse_sampler, sampler_model, sampler_runner):
    engine = reuse_sampler
    engine.stats = SamplerStats()
    turn1 = [text_request(20, greedy()), image_request(greedy())]
    out1 = engine.generate_batch(turn1)
    turn2 = [next_turn(turn1[0], out1[0], (11, 12, 13, 14, 15)),
             next_turn(turn1[1], out1[1], (21, 22, 23), with_image=True)]
    out2 = engine.generate_batch(turn2)
    turn3 = [next_turn(turn2[0], out2[0], (31, 32, 33, 34), with_image=True, seed=9)]
    out3 = engine.generate_batch(turn3)

    requests, results = turn1 + turn2 + turn3, out1 + out2 + out3
    assert_matches_full_forward(sampler_runner, requests, results)
    # each later turn continued its predecessor's slot and prefilled only what the slot did not hold
    cached = [len(q.input_ids) + len(r.output_ids) - 1 for q, r in ((turn1[0], out1[0]), (turn1[1], out1[1]),
                                                                 (turn2[0], out2[0]))]
    assert [r.extra["reused_tokens"] for r in out2 + out3] == cached
    assert out2[0].extra["slot"] == out1[0].extra["slot"] and out3[0].extra["slot"] == out2[0].extra["slot"]
    assert out2[1].extra["slot"] == out1[1].extra["slot"]
    stats = engine.stats
    assert stats.reused_rows == 3 and stats.reused_tokens == sum(cached)
    assert stats.prefill_tokens == sum(len(q.input_ids) for q in requests) - sum(cached)

    # the same turns through a sampler that prefills everything give the same tokens
    with JaxSampler(sampler_model, SamplerConfig(**{**REUSE.__dict__, "prefix_reuse": False})) as plain:
        again = plain.generate_batch(requests)
        assert plain.stats.reused_rows == 0
    for a, b in zip(results, again):
        assert a.output_ids == b.output_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_weight_update_makes_retained_prefixes_stale(sampler_hf_dirs, sampler_model, sampler_runner):
    with JaxSampler(sampler_hf_dirs["base"], REUSE, weight_version="v0") as engine:
        first = text_request(24, greedy())
        out = engine.generate_batch([first])[0]
        engine.update_weights(nnx.state(sampler_model, nnx.Param), "v1")  # same values, new version
        follow = next_turn(first, out, (40, 41, 42))
        result = engine.generate_batch([follow])[0]
        assert engine.stats.reused_rows == 0 and result.extra["reused_tokens"] == 0
        assert result.extra["weight_versions"] == ["v1"]
        assert_matches_full_forward(sampler_runner, [follow], [result])
        # under the same version the next turn does reuse, and says which version computed its prefix
        again = engine.generate_batch([next_turn(follow, result, (43, 44))])[0]
        assert again.extra["reused_tokens"] > 0 and again.extra["weight_versions"] == ["v1"]


def test_unrelated_requests_take_empty_slots_before_retained_ones(sampler_model):
    config = SamplerConfig(**{**REUSE.__dict__, "max_slots": 2})
    with JaxSampler(sampler_model, config) as engine:
        first = text_request(30, greedy())
        out = engine.generate_batch([first])[0]
        other = engine.generate_batch([text_request(9, greedy(), start=50)])[0]
        assert other.extra["slot"] != out.extra["slot"] and other.extra["reused_tokens"] == 0
        follow = engine.generate_batch([next_turn(first, out, (1, 2, 3))])[0]
        assert follow.extra["slot"] == out.extra["slot"] and follow.extra["reused_tokens"] == 30 + 8 - 1
        # a repeated prompt (a GRPO group admitted late) reuses all but its last token
        repeat = engine.generate_batch([first])[0]
        assert repeat.extra["reused_tokens"] == 29 and repeat.output_ids == out.output_ids


def test_a_continuation_keeps_its_prefix_when_an_unrelated_request_arrives_with_it(sampler_model):
    config = SamplerConfig(**{**REUSE.__dict__, "max_slots": 2})
    with JaxSampler(sampler_model, config) as engine:
        first = text_request(30, greedy())
        out = engine.generate_batch([first])[0]  # its slot now holds the oldest prefix
        engine.generate_batch([text_request(12, greedy(), start=70)])
        unrelated, follow = engine.generate_batch([text_request(9, greedy(), start=50),
                                                   next_turn(first, out, (1, 2, 3))])
        assert follow.extra["slot"] == out.extra["slot"] and follow.extra["reused_tokens"] == 30 + 8 - 1
        assert unrelated.extra["slot"] != out.extra["slot"] and unrelated.extra["reused_tokens"] == 0


def _finished(config, request: GenerationRequest, output: list[int], version: str = "0") -> RetainedPrefix:
    seq = prepare(config, request, Future(), 128, 128)
    for token in output:
        seq.accept(token, 0.0, version)
    seq.finish = "stop"
    return RetainedPrefix.of(seq, 128)


def test_reusable_length_keeps_images_whole_and_identical(sampler_model):
    config = sampler_model.config
    first = image_request(greedy())
    prefix = _finished(config, first, [7, 8, 9])
    assert prefix.ids.size == len(first.input_ids) + 2
    result = GenerationResult("x", (7, 8, 9), (0.0,) * 3, "stop", "0", len(first.input_ids))
    follow = next_turn(first, result, (1, 2, 3), with_image=True)
    seq = prepare(config, follow, Future(), 128, 128)
    assert reusable_length(prefix, seq, "0") == prefix.ids.size
    assert reusable_length(prefix, seq, "1") == 0  # other weights computed it

    # different pixels in the first image: nothing from its start on is reusable
    changed = follow.images.pixel_values.copy()
    changed[0] += 1.0
    other = prepare(config, GenerationRequest(follow.input_ids, follow.params,
                                              ImageInputs(changed, follow.images.image_grid_thw)), Future(), 128, 128)
    assert reusable_length(prefix, other, "0") == int(seq.images.starts[0])

    # a retained prefix that ends inside the second image's placeholders is cut back to that image's start
    cut = int(seq.images.starts[1]) + 2
    partial = RetainedPrefix(ids=prefix.ids[:cut], images=prefix.images, versions=("0",))
    assert reusable_length(partial, seq, "0") == int(seq.images.starts[1])

    # the prefill then encodes only the images after the reused prefix (the one new image)
    seq.slot, seq.reuse = 0, reusable_length(prefix, seq, "0")
    batch = build_prefill([seq], 1, 16, 4, config, 16)
    segments = np.asarray(batch.vision.segment_ids)
    assert (segments >= 0).sum() == int(np.prod(NEW_GRID)) and len(set(segments[segments >= 0])) == 1
    assert int(batch.offsets[0]) == seq.reuse and int(batch.last_index[0]) == len(follow.input_ids) - seq.reuse - 1
