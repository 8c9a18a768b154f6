"""`SGLangEngine` / `SGLangClient` against a loopback fake SGLang server with its real shapes, and against
gsjax's own policy server (which must be a drop-in for it)."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from gsjax.processing.tokens import IM_END_ID, IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID
from gsjax.rollout.engine import EngineError, GenerationRequest, ImageInputs, RolloutEngine, SamplingParams
from gsjax.rollout.server import create_app
from gsjax.rollout.sglang import RetryPolicy, SGLangClient, SGLangEngine, SGLangHTTPError, parse_generate
from tests.imagegen.loopback import LoopbackUvicorn
from tests.rollout.fake_sglang import FakeSGLang, reply_ids, serving
from tests.rollout.fakes import SMALL_IMAGES, FakeEngine, fake_logprob, png_bytes, write_hf_dir

FAST = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.02, request_timeout_s=0.5, connect_timeout_s=2)
PROMPT = (11, 12, 13, 14)


def generate(engine: SGLangEngine, *requests: GenerationRequest) -> list:
    async def main() -> list:
        return await engine.generate_many(list(requests))

    return asyncio.run(main())


@pytest.fixture
def fake(tmp_path):
    state = FakeSGLang(model_path=str(write_hf_dir(tmp_path / "base")), weight_version="v0", timeout_sleep_s=1.0)
    with serving(state) as url:
        yield state, url


def test_engine_implements_the_protocol_and_generates_with_logprobs(fake):
    state, url = fake
    engine = SGLangEngine(url, retry=FAST)
    assert isinstance(engine, RolloutEngine)
    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.8, top_k=20, stop_token_ids=(IM_END_ID,), seed=5)
    (result,) = generate(engine, GenerationRequest(PROMPT, params, request_id="q1"))
    assert result.output_ids == (*reply_ids(list(PROMPT)), IM_END_ID)
    assert result.logprobs == tuple(-0.1 - 0.01 * i for i in range(len(result.output_ids)))
    assert result.finish_reason == "stop" and result.weight_version == "v0" and result.request_id == "q1"
    assert result.prompt_tokens == len(PROMPT)
    name, body = state.calls[-1]
    assert name == "generate" and body["input_ids"] == list(PROMPT) and body["return_logprob"] is True
    assert body["sampling_params"] == {"max_new_tokens": 32, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                       "stop_token_ids": [IM_END_ID], "no_stop_trim": True,
                                       "skip_special_tokens": False, "sampling_seed": 5}
    assert "image_data" not in body
    assert engine.weight_version == "v0"
    engine.close()


def test_length_finish_and_images_sent_as_data_urls(fake):
    state, url = fake
    engine = SGLangEngine(url, retry=FAST)
    image = png_bytes(seed=4)
    images = ImageInputs(pixel_values=np.zeros((4, 8), np.float32), image_grid_thw=np.asarray([[1, 2, 2]]),
                         encoded=(image,))
    ids = (1, VISION_START_ID, IMAGE_PAD_ID, VISION_END_ID, 2)
    (result,) = generate(engine, GenerationRequest(ids, SamplingParams(max_tokens=3), images))
    assert result.finish_reason == "length" and len(result.output_ids) == 3
    body = state.calls[-1][1]
    assert body["image_data"] == ["data:image/png;base64," + base64.b64encode(image).decode()]
    no_files = ImageInputs(pixel_values=images.pixel_values, image_grid_thw=images.image_grid_thw)
    with pytest.raises(EngineError, match="encoded image files"):
        generate(engine, GenerationRequest(ids, SamplingParams(), no_files))
    engine.close()


def test_transient_failures_are_retried_and_client_errors_are_not(fake):
    state, url = fake
    engine = SGLangEngine(url, retry=FAST)
    state.fault("/generate", "500", "timeout")
    (result,) = generate(engine, GenerationRequest(PROMPT, SamplingParams()))
    assert result.finish_reason == "stop"
    assert state.names().count("generate") == 3  # 500, timeout, success
    state.fault("/generate", "500", "500", "500")
    with pytest.raises(SGLangHTTPError) as info:
        generate(engine, GenerationRequest(PROMPT, SamplingParams()))
    assert info.value.status == 500
    before = state.names().count("generate")
    with pytest.raises(SGLangHTTPError) as bad:
        generate(engine, GenerationRequest((), SamplingParams()))  # the fake answers 400: input_ids required
    assert bad.value.status == 400 and state.names().count("generate") == before + 1
    state.fault("/generate", *["timeout"] * FAST.max_attempts)  # a transport failure on every attempt
    failed = r"^/generate: ReadTimeout: on POST http://127\.0\.0\.1:\d+/generate \(attempt 3 of 3\)"
    with pytest.raises(EngineError, match=failed):
        generate(engine, GenerationRequest(PROMPT, SamplingParams()))
    engine.close()


def test_control_plane_calls_and_version_lookup(fake):
    state, url = fake
    client = SGLangClient(url, FAST)
    assert client.healthy() and client.weight_version() == "v0"
    assert client.model_info()["model_path"] == state.model_path
    state.fault("/flush_cache", "busy")
    assert client.flush_cache() is False and client.flush_cache() is True
    state.fault("/get_weight_version", "500")
    assert client.weight_version() == "v0"  # retried
    client.close()
    impatient = SGLangClient(url, FAST, control_timeout_s=FAST.request_timeout_s)
    state.fault("/get_model_info", *["timeout"] * FAST.max_attempts)
    failed = r"^get_model_info: ReadTimeout: timed out on GET http://127\.0\.0\.1:\d+/get_model_info \(attempt 3 of 3\)"
    with pytest.raises(EngineError, match=failed):
        impatient.model_info()
    assert state.names().count("get_model_info") == 1 + FAST.max_attempts
    impatient.close()


def test_malformed_replies_are_engine_errors():
    request = GenerationRequest(PROMPT, SamplingParams())
    good = {"meta_info": {"finish_reason": {"type": "stop", "matched": 2}, "weight_version": "w",
                          "prompt_tokens": 4, "output_token_logprobs": [[-0.5, 7, None], [-0.25, 2, None]]}}
    result = parse_generate(good, request, "fallback")
    assert result.output_ids == (7, 2) and result.logprobs == (-0.5, -0.25) and result.weight_version == "w"
    aborted = {"meta_info": {"finish_reason": {"type": "abort", "message": "paused"}, "output_token_logprobs": []}}
    assert parse_generate(aborted, request, "fb").finish_reason == "abort"
    assert parse_generate(aborted, request, "fb").extra["message"] == "paused"
    for broken in ({}, {"meta_info": {"finish_reason": {"type": "weird"}, "output_token_logprobs": []}},
                   {"meta_info": {"finish_reason": {"type": "stop"}}},
                   {"meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[None]]}}):
        with pytest.raises(EngineError):
            parse_generate(broken, request, "fb")


def test_gsjax_policy_server_is_a_drop_in_for_sglang(qwen_tokenizer, tmp_path):
    """The same client and weight syncer drive gsjax's own server: generate, then a full weight sync."""
    fake_engine = FakeEngine([[5, 6, IM_END_ID]], version="v0")
    with LoopbackUvicorn(create_app(fake_engine, qwen_tokenizer, SMALL_IMAGES)) as server:
        engine = SGLangEngine(server.url, retry=FAST, initial_model_path=str(tmp_path))
        (result,) = generate(engine, GenerationRequest(PROMPT, SamplingParams(stop_token_ids=(IM_END_ID,))))
        assert result.output_ids == (5, 6, IM_END_ID) and result.weight_version == "v0"
        assert result.logprobs == tuple(fake_logprob(i, t) for i, t in enumerate(result.output_ids))
        engine.update_weights(write_hf_dir(tmp_path / "step-1"), "v1")
        assert engine.weight_version == "v1" and fake_engine.version == "v1"
        (after,) = generate(engine, GenerationRequest(PROMPT, SamplingParams()))
        assert after.weight_version == "v1"
        engine.close()
