"""The embedded JAX sampler against the model's own uncached forward, and its engine contract: per-request
parameters, batch independence, batching of concurrent calls, weight updates, static shapes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from concurrent.futures import Future

import jax
import numpy as np
import pytest
from flax import nnx

from gsjax.models.qwen3_vl.checkpoint import load_hf
from gsjax.models.qwen3_vl.config import RuntimeConfig
from gsjax.models.qwen3_vl.forward import Runner
from gsjax.rollout.batch_decoder import BatchDecoder
from gsjax.rollout.engine import EngineError, GenerationRequest, RolloutEngine, SamplingParams
from gsjax.rollout.jax_sampler import JaxSampler, SamplerConfig, SamplerStats
from gsjax.rollout.sampling import batch_mode
from gsjax.rollout.slots import build_prefill, prepare

from .conftest import assert_matches_full_forward, image_request, text_request

CONFIG = SamplerConfig(max_slots=4, max_total_len=64, min_prefill_bucket=32)


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.fixture(scope="module")
def sampler(sampler_model):
    engine = JaxSampler(sampler_model, CONFIG)
    yield engine
    engine.close()


def test_is_a_rollout_engine(sampler):
    assert isinstance(sampler, RolloutEngine)
    assert sampler.weight_version == "0"


def test_greedy_with_cache_equals_full_forward_text_and_images(sampler, sampler_runner):
    # five requests of different lengths (one with two images) for four slots: the last one refills a slot
    requests = [text_request(3, greedy()), image_request(greedy()), text_request(21, greedy()),
                text_request(9, greedy()), text_request(14, greedy(), start=11)]
    results = sampler.generate_batch(requests)
    assert [r.request_id for r in results] == [q.request_id for q in requests]
    for q, r in zip(requests, results):
        assert len(r.output_ids) == 12 and r.finish_reason == "length" and r.prompt_tokens == len(q.input_ids)
    assert_matches_full_forward(sampler_runner, requests, results)


def test_sampled_logprobs_equal_full_forward(sampler, sampler_runner):
    params = SamplingParams(max_tokens=10, temperature=1.3, top_k=40, top_p=0.95, seed=4)
    requests = [text_request(8, params), image_request(params)]
    results = sampler.generate_batch(requests)
    assert_matches_full_forward(sampler_runner, requests, results, greedy_rows=False)


def test_output_is_independent_of_batch_composition_and_slot(sampler):
    probes = [text_request(6, greedy(), request_id="greedy"),
              text_request(6, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=11),
                           start=9, request_id="sampled"),
              image_request(SamplingParams(max_tokens=12, temperature=0.8, seed=3), request_id="image")]
    alone = [sampler.generate_batch([q])[0] for q in probes]
    others = [text_request(n, SamplingParams(max_tokens=m, temperature=1.0, seed=n), start=n)
              for n, m in ((17, 5), (2, 12), (25, 3))]
    mixed = sampler.generate_batch(others + probes)[len(others):]
    for a, b in zip(alone, mixed):
        assert a.output_ids == b.output_ids, a.request_id
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert any(a.extra["slot"] != b.extra["slot"] for a, b in zip(alone, mixed))


def test_per_request_sampling_parameters(sampler):
    base = sampler.generate_batch([text_request(7, greedy(16))])[0].output_ids
    # stop at the first occurrence of some token after the start
    j = next((i for i in range(1, len(base)) if base[i] not in base[:i]), 0)
    requests = [text_request(7, greedy(16, stop_token_ids=(base[j], 255))),
                text_request(7, greedy(4)),
                text_request(7, SamplingParams(max_tokens=16, temperature=1.0, top_k=1, seed=1)),
                text_request(7, SamplingParams(max_tokens=16, temperature=0.7, top_p=1e-6, seed=2))]
    stop, short, top1, top_p = sampler.generate_batch(requests)
    assert stop.output_ids == base[:j + 1] and stop.finish_reason == "stop"
    assert short.output_ids == base[:4] and short.finish_reason == "length"
    assert top1.output_ids == base and top_p.output_ids == base

    def sampled(seed: int):
        return text_request(7, SamplingParams(max_tokens=16, temperature=1.0, seed=seed))

    a, b, c = sampler.generate_batch([sampled(5), sampled(5), sampled(6)])
    assert a.output_ids == b.output_ids and a.logprobs == b.logprobs
    assert a.output_ids != c.output_ids and a.output_ids != base


def test_concurrent_generate_calls_are_batched(sampler):
    sampler.stats = SamplerStats()

    async def calls():
        single = [sampler.generate(text_request(4 + i, greedy(10), start=i)) for i in range(4)]
        return await asyncio.gather(*single, sampler.generate_many([text_request(5, greedy(10))] * 2))

    *singles, many = asyncio.run(calls())
    assert all(len(r.output_ids) == 10 for r in [*singles, *many])
    assert many[0].output_ids == many[1].output_ids
    stats = sampler.stats
    assert stats.peak_live == 4 and stats.tokens == 60
    # six requests of ten tokens one after another take 6 x 9 = 54 decode steps; four shared slots need about
    # two rounds, three when the threads' timing (a loaded CI machine, a first-use compile) staggers arrivals
    assert stats.decode_steps <= 32
    assert stats.device_wait_s > 0  # the loop read every step's results back


def test_idle_time_is_counted_while_the_sampler_waits(sampler):
    # the fixture is shared: an earlier test's last (speculative) step may still be read back, so wait until
    # the loop blocks on its inbox before resetting the counters
    deadline = time.monotonic() + 30
    while not sampler.waiting_for_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sampler.waiting_for_requests
    sampler.stats = SamplerStats()
    time.sleep(0.5)  # no requests: the loop waits, and a reading during the wait includes it
    assert sampler.idle_seconds() >= 0.5 and sampler.stats.device_wait_s == 0
    sampler.generate_batch([text_request(4, greedy(2))])
    assert sampler.stats.device_wait_s > 0


def test_cache_capacity_ends_generation_with_length(sampler, sampler_runner):
    request = text_request(60, greedy(50))
    result = sampler.generate_batch([request])[0]
    assert len(result.output_ids) == CONFIG.max_total_len - 60 + 1 and result.finish_reason == "length"
    assert_matches_full_forward(sampler_runner, [request], [result])


@contextlib.contextmanager
def count_backend_compiles():
    events: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_decode_compiles_once_per_window_bucket_never_per_token(sampler_hf_dirs, impl):
    """The windowed kernel (GPU, TPU, or impl="xla") compiles one decode variant per window bucket it reaches;
    the blocked CPU kernel ("chunked") a single one over the whole cache. Neither compiles per token."""
    sampler = JaxSampler(sampler_hf_dirs["base"], CONFIG, runtime=RuntimeConfig(attention_impl=impl))
    try:
        assert sampler.window_buckets == (32, 48, 64)  # the prefill buckets 32, 64, each octave cut in two
        assert sampler.decode_windows == ((64,) if impl == "chunked" else sampler.window_buckets)
        # 5 and 7 + 40 tokens cross from the 32-slot window into the 48-slot one: one new variant per bucket
        first = sampler.generate_batch([text_request(5, greedy(40)), text_request(7, greedy(40))])
        warm = sampler.compilations()
        assert warm["decode"] == (1 if impl == "chunked" else 2)
        with count_backend_compiles() as compiles:
            results = sampler.generate_batch([text_request(5, greedy(40)), text_request(7, greedy(40))])
        assert [len(r.output_ids) for r in results] == [40, 40]
        assert [r.output_ids for r in results] == [r.output_ids for r in first]
        assert compiles == [] and sampler.compilations() == warm
    finally:
        sampler.close()


def test_decode_over_a_short_window_equals_the_whole_cache(sampler_model):
    """The same slots decoded over a 32-slot window, over the whole 128-slot cache, and over the whole cache with
    the live rows' bound (where the blocked kernel stops) give bit-identical tokens and logprobs (the keys past
    the window are masked either way), greedy and sampled rows alike."""
    config = sampler_model.config
    requests = [text_request(9, SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=20, seed=1)),
                text_request(3, greedy(8)), image_request(SamplingParams(max_tokens=8, temperature=0.7, seed=2))]
    seqs = [prepare(config, q, Future(), 32, 128) for q in requests]
    for slot, seq in enumerate(seqs):
        seq.slot = slot
    assert max(s.next_cache_length() for s in seqs) + 8 <= 32
    batch = build_prefill(seqs, 4, 32, 4, config, 256)
    mode = batch_mode(q.params for q in requests)
    outputs = []
    for window, bound in ((32, None), (None, None), (None, 32)):
        decoder = BatchDecoder(sampler_model, 4, 128)
        steps = [decoder.prefill(batch, mode)[:2]] + [decoder.decode(mode, window, bound)[:2] for _ in range(8)]
        outputs.append([np.asarray(a) for step in steps for a in step])
        cache = decoder.cache
        assert not np.asarray(cache.kv_valid)[:3, 32:].any()  # nothing live was written past the window
    for short, full, bounded in zip(*outputs):
        np.testing.assert_array_equal(short, full)
        np.testing.assert_array_equal(bounded, full)
    with pytest.raises(ValueError, match="decode bound 33 is outside"):
        decoder.decode(mode, 32, 33)


def test_bad_requests_raise_engine_error(sampler):
    with pytest.raises(EngineError, match="exceeds"):
        sampler.submit([text_request(65, greedy())])
    with pytest.raises(EngineError, match="image placeholder tokens"):
        sampler.submit([GenerationRequest(input_ids=(1, 200, 200, 200, 200, 2), params=greedy())])


def test_an_image_past_the_frame_bound_is_refused_at_submit_and_the_sampler_goes_on(sampler_hf_dirs):
    """The second image is 4x8 = 32 patch rows; with runtime.vision_max_frame_rows=16 the request is refused
    before it is queued (a prefill failure would abort every live request), and other requests still run."""
    model = load_hf(sampler_hf_dirs["base"], runtime=RuntimeConfig(vision_max_frame_rows=16))
    with JaxSampler(model, CONFIG) as engine:
        with pytest.raises(EngineError, match=r"request 'image'.*image 1 \(grid \[1, 4, 8\]\).*=16"):
            engine.submit([image_request(greedy())])
        [result] = engine.generate_batch([text_request(6, greedy(4))])
        assert len(result.output_ids) == 4


def test_update_weights_from_state_and_hf_dir(sampler_hf_dirs):
    engine = JaxSampler(sampler_hf_dirs["base"], CONFIG, weight_version="v0")
    request = [text_request(6, greedy(10)), image_request(greedy(10))]
    first = engine.generate_batch(request)
    assert {r.weight_version for r in first} == {"v0"}
    compiled = engine.compilations()

    other = load_hf(sampler_hf_dirs["other"])
    engine.update_weights(nnx.state(other, nnx.Param), "v1")
    assert engine.weight_version == "v1"
    second = engine.generate_batch(request)
    assert {r.weight_version for r in second} == {"v1"} and second[0].extra["weight_versions"] == ["v1"]
    assert second[0].output_ids != first[0].output_ids
    assert_matches_full_forward(Runner(other), request, second)

    engine.update_weights(sampler_hf_dirs["base"], "v2")
    third = engine.generate_batch(request)
    assert [r.output_ids for r in third] == [r.output_ids for r in first]
    assert {r.weight_version for r in third} == {"v2"} and engine.compilations() == compiled

    with pytest.raises(ValueError, match="shape"):
        engine.update_weights(nnx.State({"norm": {"scale": nnx.Param(np.ones(3, np.float32))}}), "bad")
    engine.close()


def test_close_resolves_requests_and_refuses_new_ones(sampler_model):
    engine = JaxSampler(sampler_model, SamplerConfig(max_slots=2, max_total_len=64, min_prefill_bucket=32))
    futures = engine.submit([text_request(4, greedy(60)), text_request(5, greedy(60)), text_request(6, greedy(60))])
    engine.close()
    results = [f.result(timeout=60) for f in futures]
    assert all(r.finish_reason in ("abort", "length") for r in results)
    assert any(r.finish_reason == "abort" for r in results)  # the third never got a slot before close
    with pytest.raises(EngineError, match="closed"):
        engine.submit([text_request(4, greedy())])


def test_min_prefill_rows_pads_every_prefill_to_one_row_count(sampler_model, sampler):
    """Admission groups of 1, 2 and 3 requests share one prefill program when rows are padded to 4, and
    the padding rows change nothing (same ids and logprobs as the default config's sampler)."""
    batches = [[text_request(5, greedy(6))], [text_request(7, greedy(6)), text_request(9, greedy(6), start=3)],
               [text_request(n, greedy(6), start=n) for n in (4, 6, 8)]]
    with JaxSampler(sampler_model, dataclasses.replace(CONFIG, min_prefill_rows=4)) as padded:
        assert padded.row_buckets == (4,)
        results = [padded.generate_batch(batch) for batch in batches]
        assert padded.compilations()["prefill"] == 1
    for batch, got in zip(batches, results):
        for want, have in zip(sampler.generate_batch(batch), got):
            assert want.output_ids == have.output_ids
            np.testing.assert_allclose(want.logprobs, have.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match=r"min_prefill_rows=8 must be in \[1, max_slots=4\]"):
        JaxSampler(sampler_model, dataclasses.replace(CONFIG, min_prefill_rows=8))
