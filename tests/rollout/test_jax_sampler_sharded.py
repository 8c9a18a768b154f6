"""The embedded sampler on an 8-device mesh (fsdp 4 × tensor 2, the training layout) decodes what the single
device forward predicts."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec

from gsjax.parallel.mesh import MeshConfig, build_mesh
from gsjax.rollout.engine import SamplingParams
from gsjax.rollout.jax_sampler import JaxSampler, SamplerConfig

from .conftest import image_request, next_turn, reference_logprobs, text_request

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def test_sharded_sampler_matches_single_device_forward(sampler_hf_dirs, sampler_runner):
    mesh = build_mesh(MeshConfig(fsdp=4, tensor=2))
    with pytest.raises(ValueError, match="multiple of the 4 devices"):
        JaxSampler(sampler_hf_dirs["base"], SamplerConfig(max_slots=6), mesh=mesh)
    engine = JaxSampler(sampler_hf_dirs["base"], SamplerConfig(max_slots=4, max_total_len=64, min_prefill_bucket=32,
                                                               min_reuse_tokens=1), mesh=mesh)
    try:
        assert engine.decoder.cache.layers[0].k.sharding.spec == PartitionSpec("fsdp", "tensor")  # (B, K, S, H)
        params = SamplingParams(max_tokens=10, temperature=0.0)
        requests = [text_request(3, params), image_request(params), text_request(21, params),
                    text_request(9, params), text_request(30, params)]
        results = engine.generate_batch(requests)
        # prompts up to 30 tokens plus 10 outputs: on CPU one decode program over the whole sharded cache (its
        # kernel visits the live key blocks only; the window buckets serve the prefix-reuse prefills)
        assert engine.window_buckets == (32, 48, 64) and engine.decode_windows == (64,)
        assert engine.compilations()["decode"] == 1
        # second turns continue the first turns' sharded cache rows (prefix reuse gathers and scatters them)
        follow = [next_turn(requests[i], results[i], (41, 42, 43)) for i in (0, 1)]
        second = engine.generate_batch(follow)
        assert [r.extra["reused_tokens"] for r in second] == [len(requests[i].input_ids) + 9 for i in (0, 1)]
        for q, r, ref in zip(requests + follow, results + second,
                             reference_logprobs(sampler_runner, requests + follow, results + second)):
            assert list(ref.argmax(-1)) == list(r.output_ids), q.request_id
            assert abs(ref[range(len(r.output_ids)), list(r.output_ids)] - r.logprobs).max() < 1e-4
    finally:
        engine.close()
