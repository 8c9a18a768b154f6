"""The policy server over a fake engine: OpenAI chat (text, data-URL images, stop, max_tokens, usage, finish
reasons, errors), SGLang's `/generate` shape, and the weight-update endpoints."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from gsjax.processing.chat import encode_chat
from gsjax.processing.images import process_images
from gsjax.processing.tokens import IM_END_ID, IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID
from gsjax.rollout.server import PolicyServerConfig, create_app
from tests.rollout.fakes import SMALL_IMAGES, FakeEngine, data_url, fake_logprob, png_bytes

CFG = SMALL_IMAGES


def call(engine: FakeEngine, tokenizer: Any, requests: list[tuple[str, str, dict | None]],
         config: PolicyServerConfig | None = None) -> list[httpx.Response]:
    """Send (method, path, json) requests in order to a fresh app over ASGI."""
    app = create_app(engine, tokenizer, CFG, config or PolicyServerConfig(max_context_tokens=4096))

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://policy") as client:
            return [await client.request(method, path, json=body) for method, path, body in requests]

    return asyncio.run(main())


def reply_of(tokenizer: Any, text: str, end: bool = True) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) + ([IM_END_ID] if end else [])


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def test_chat_text_reply_usage_and_exact_prompt(qwen_tokenizer):
    engine = FakeEngine([reply_of(qwen_tokenizer, "Hello there, world.")], version="v7")
    (resp,) = call(engine, qwen_tokenizer, [("POST", "/v1/chat/completions",
                                             {"model": "m", "messages": MESSAGES, "temperature": 0.5, "top_p": 0.9})])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello there, world."}
    assert choice["finish_reason"] == "stop" and body["object"] == "chat.completion"
    expected = encode_chat(MESSAGES, qwen_tokenizer, CFG, add_generation_prompt=True)
    (request,) = engine.requests
    assert list(request.input_ids) == expected.input_ids.tolist()
    assert request.params.temperature == 0.5 and request.params.top_p == 0.9 and request.images is None
    assert IM_END_ID in request.params.stop_token_ids
    completion = len(reply_of(qwen_tokenizer, "Hello there, world."))
    assert body["usage"] == {"prompt_tokens": len(expected), "completion_tokens": completion,
                             "total_tokens": len(expected) + completion}
    assert body["metadata"]["weight_version"] == "v7"


def test_chat_with_data_url_images_feeds_processed_pixels(qwen_tokenizer):
    first, second = png_bytes(seed=1), png_bytes(90, 40, seed=2)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(first)}},
        {"type": "image_url", "image_url": data_url(second)},
        {"type": "text", "text": "Compare them."}]}]
    engine = FakeEngine([reply_of(qwen_tokenizer, "Both are noise.")])
    (resp,) = call(engine, qwen_tokenizer, [("POST", "/v1/chat/completions", {"messages": messages})])
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "Both are noise."
    (request,) = engine.requests
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in (first, second)]
    pixels, grid = process_images(arrays, CFG)
    assert request.images is not None and request.images.encoded == (first, second)
    np.testing.assert_array_equal(request.images.image_grid_thw, grid)
    np.testing.assert_array_equal(request.images.pixel_values, pixels)
    pads = sum(1 for t in request.input_ids if t == IMAGE_PAD_ID)
    assert pads == int(np.prod(grid, axis=1).sum()) // CFG.merge_size**2


def test_chat_max_tokens_gives_length_and_stop_strings_cut(qwen_tokenizer):
    long = reply_of(qwen_tokenizer, "alpha beta gamma delta epsilon")
    engine = FakeEngine([long])
    responses = call(engine, qwen_tokenizer, [
        ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3}),
        ("POST", "/v1/chat/completions", {"messages": MESSAGES, "stop": [" gamma", "</tool_call>"]}),
        ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 2, "stop": "zzz"}),
    ])
    short, stopped, capped = (r.json() for r in responses)
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
    assert short["choices"][0]["message"]["content"] == qwen_tokenizer.decode(long[:3])
    assert engine.requests[0].params.max_tokens == 3
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["message"]["content"] == "alpha beta"
    kept = stopped["usage"]["completion_tokens"]
    assert " gamma" in qwen_tokenizer.decode(long[:kept]) and " gamma" not in qwen_tokenizer.decode(long[:kept - 1])
    tool_call_end = qwen_tokenizer.convert_tokens_to_ids("</tool_call>")
    assert tool_call_end in engine.requests[1].params.stop_token_ids  # one-token stop: the engine stops on it
    assert capped["choices"][0]["finish_reason"] == "length" and capped["usage"]["completion_tokens"] == 2


def test_chat_logprobs_are_the_engines(qwen_tokenizer):
    reply = reply_of(qwen_tokenizer, "Fine.")
    (resp,) = call(FakeEngine([reply]), qwen_tokenizer,
                   [("POST", "/v1/chat/completions", {"messages": MESSAGES, "logprobs": True})])
    content = resp.json()["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == [fake_logprob(i, t) for i, t in enumerate(reply)]
    assert "".join(c["token"] for c in content) == qwen_tokenizer.decode(reply, skip_special_tokens=False)


@pytest.mark.parametrize(("body", "message"), [
    ({"messages": MESSAGES, "stream": True}, "stream"),
    ({"messages": MESSAGES, "n": 2}, "n=1"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "data URLs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]}]},
     "cannot be decoded"),
    ({"messages": MESSAGES, "max_tokens": 5000}, "maximum context length"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"model": "m"}, "invalid request"),
])
def test_chat_bad_requests_are_400_with_a_reason(qwen_tokenizer, body, message):
    engine = FakeEngine()
    (resp,) = call(engine, qwen_tokenizer, [("POST", "/v1/chat/completions", body)])
    assert resp.status_code == 400
    assert message in resp.json()["message"] and resp.json()["code"] == 400
    assert engine.requests == []


def test_generate_has_sglangs_shape(qwen_tokenizer):
    reply = [11, 12, 13, IM_END_ID]
    engine = FakeEngine([reply], version="step-3")
    prompt = [100, 101, 102]
    full, short, default = (r.json() for r in call(engine, qwen_tokenizer, [
        ("POST", "/generate", {"input_ids": prompt, "return_logprob": True, "rid": "r1",
                               "sampling_params": {"max_new_tokens": 16, "temperature": 0.0}}),
        ("POST", "/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": 2}}),
        ("POST", "/generate", {"text": "Hello", "sampling_params": {"stop_token_ids": [7], "ignore_eos": True}}),
    ]))
    assert full["output_ids"] == reply
    meta = full["meta_info"]
    assert meta["id"] == "r1" and meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 4
    assert meta["finish_reason"] == {"type": "stop", "matched": IM_END_ID}
    assert meta["weight_version"] == "step-3"
    assert meta["output_token_logprobs"] == [[fake_logprob(i, t), t, None] for i, t in enumerate(reply)]
    assert engine.requests[0].params.temperature == 0.0 and engine.requests[0].params.max_tokens == 16
    assert short["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
    assert short["output_ids"] == reply[:2] and "output_token_logprobs" not in short["meta_info"]
    assert list(engine.requests[2].input_ids) == qwen_tokenizer.encode("Hello", add_special_tokens=False)
    assert engine.requests[2].params.max_tokens == 128  # SGLang's default
    assert engine.requests[2].params.stop_token_ids == (7,)  # ignore_eos drops the model's stop ids


def test_generate_expands_image_pads_from_the_real_grid(qwen_tokenizer):
    image = png_bytes(seed=3)
    engine = FakeEngine([[5, IM_END_ID]])
    pixels, grid = process_images([np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))], CFG)
    count = int(np.prod(grid[0])) // CFG.merge_size**2
    one_pad = [1, VISION_START_ID, IMAGE_PAD_ID, VISION_END_ID, 2]
    expanded = [1, VISION_START_ID, *[IMAGE_PAD_ID] * count, VISION_END_ID, 2]
    wrong = [1, VISION_START_ID, IMAGE_PAD_ID, IMAGE_PAD_ID, VISION_END_ID, 2]
    responses = call(engine, qwen_tokenizer, [
        ("POST", "/generate", {"input_ids": one_pad, "image_data": data_url(image)}),
        ("POST", "/generate", {"input_ids": expanded, "image_data": [data_url(image)]}),
        ("POST", "/generate", {"input_ids": wrong, "image_data": [data_url(image)]}),
        ("POST", "/generate", {"input_ids": one_pad, "image_data": [data_url(image), data_url(image)]}),
    ])
    assert [r.status_code for r in responses] == [200, 200, 400, 400]
    assert responses[0].json()["meta_info"]["prompt_tokens"] == len(expanded)
    for request in engine.requests:
        assert list(request.input_ids) == expanded
        np.testing.assert_array_equal(request.images.pixel_values, pixels)
    assert "<|image_pad|> tokens" in responses[2].json()["message"]
    assert "2 images" in responses[3].json()["message"]


def test_weight_update_changes_the_served_version(qwen_tokenizer, tmp_path):
    engine = FakeEngine(version="v0")
    (tmp_path / "step-1").mkdir()
    engine_fails = FakeEngine(version="v0")
    engine_fails.fail_updates = 1
    update = {"model_path": str(tmp_path / "step-1"), "weight_version": "v1"}
    responses = call(engine, qwen_tokenizer, [
        ("POST", "/update_weights_from_disk", update),
        ("GET", "/get_weight_version", None),
        ("POST", "/generate", {"input_ids": [1, 2], "return_logprob": True}),
        ("GET", "/get_model_info", None),
        ("POST", "/update_weights_from_disk", {"model_path": str(tmp_path / "missing"), "weight_version": "v2"}),
        ("GET", "/health", None),
    ])
    ok, version, generated, info, missing, health = responses
    assert ok.status_code == 200 and ok.json()["success"] is True and "v1" in ok.json()["message"]
    assert version.json() == {"weight_version": "v1"} and info.json()["weight_version"] == "v1"
    assert generated.json()["meta_info"]["weight_version"] == "v1"
    assert engine.updates == [(tmp_path / "step-1", "v1")]
    assert missing.status_code == 400 and missing.json()["success"] is False
    assert health.status_code == 200 and health.json()["weight_version"] == "v1"
    failed, after = call(engine_fails, qwen_tokenizer, [("POST", "/update_weights_from_disk", update),
                                                        ("GET", "/get_weight_version", None)])
    assert failed.status_code == 400 and "cannot load" in failed.json()["message"]
    assert after.json()["weight_version"] == "v0"


def test_pause_holds_new_requests_and_flush_waits_for_running_ones(qwen_tokenizer, tmp_path):
    engine = FakeEngine([[5, IM_END_ID]])
    app = create_app(engine, qwen_tokenizer, CFG)

    async def main() -> None:
        engine.hold = asyncio.Event()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as client:
            running = asyncio.create_task(client.post("/generate", json={"input_ids": [1]}))
            while not engine.requests:
                await asyncio.sleep(0.01)
            assert (await client.post("/flush_cache")).status_code == 400  # a request is inside the engine
            engine.hold.set()
            assert (await running).status_code == 200
            assert (await client.post("/flush_cache")).status_code == 200
            assert (await client.post("/pause_generation", json={"mode": "abort"})).json()["status"] == "ok"
            waiting = asyncio.create_task(client.post("/generate", json={"input_ids": [2]}))
            await asyncio.sleep(0.1)
            assert not waiting.done() and len(engine.requests) == 1
            (tmp_path / "w").mkdir()
            update = await client.post("/update_weights_from_disk",
                                       json={"model_path": str(tmp_path / "w"), "weight_version": "v9"})
            assert update.json()["success"] and not waiting.done()  # still paused after the update
            await client.post("/continue_generation")
            done = await waiting
            assert done.json()["meta_info"]["weight_version"] == "v9"

    asyncio.run(main())


def test_generate_refuses_sampling_it_would_silently_ignore(qwen_tokenizer):
    engine = FakeEngine()
    penalty, neutral, typo, logit_bias = call(engine, qwen_tokenizer, [
        ("POST", "/generate", {"input_ids": [1], "sampling_params": {"frequency_penalty": 0.5}}),
        ("POST", "/generate", {"input_ids": [1], "sampling_params": {"frequency_penalty": 0, "logit_bias": {},
                                                                     "no_stop_trim": True, "n": 1}}),
        ("POST", "/generate", {"input_ids": [1], "sampling_params": {"max_tokens": 5}}),
        ("POST", "/generate", {"input_ids": [1], "sampling_params": {"logit_bias": {"5": 10}}}),
    ])
    assert (penalty.status_code, neutral.status_code, typo.status_code, logit_bias.status_code) == (400, 200, 400, 400)
    assert "frequency_penalty=0.5 is not supported" in penalty.json()["message"]
    assert "unsupported sampling_params ['max_tokens']" in typo.json()["message"]
    assert len(engine.requests) == 1
