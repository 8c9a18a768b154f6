"""The image-server client against loopback fakes: bounded retries with backoff on 5xx, timeouts and
refused connections; no retry on 4xx or `success: false`; server choice over several URLs; config."""

from __future__ import annotations

import base64
import random
import socket
import threading
import time

import pytest
from pydantic import ValidationError

from gsjax.imagegen.client import (
    ImageGenConfig,
    ImageServerClient,
    ServerSlots,
    make_image_generator,
    parse_urls,
)
from gsjax.imagegen.openai_images import OpenAIImagesClient
from gsjax.imagegen.schema import GenerationOptions
from gsjax.imagegen.transport import (
    GenerationFailed,
    HttpSettings,
    RequestRejected,
    RetryPolicy,
    ServiceUnavailable,
    backoff_s,
)
from tests.imagegen.fakes import encoded_image, pixel
from tests.rewards.fake_servers import (
    LoopbackServer,
    Reply,
    image_server_reply,
    scripted,
)

OK_IMAGE = encoded_image((7, 8, 9))
OK = Reply(200, {"success": True, "image": base64.b64encode(OK_IMAGE).decode()})


def client(
    url: str | list[str], attempts: int = 3, timeout_s: float = 5.0, seed: int = 0
) -> tuple[ImageServerClient, list[float]]:
    """A client whose backoff sleeps are recorded instead of slept."""
    sleeps: list[float] = []
    retry = RetryPolicy(max_attempts=attempts, backoff_base_s=0.5)
    http = HttpSettings(timeout_s=timeout_s, connect_timeout_s=1.0, retry=retry)
    return ImageServerClient(url, http=http, sleep=sleeps.append, rng=random.Random(seed)), sleeps


def test_5xx_replies_are_retried_with_growing_backoff_until_an_image_comes():
    replies = [Reply(500, {"detail": "boom"}), Reply(503, {"detail": "no GPU free"}), OK]
    with LoopbackServer(scripted(replies)) as server:
        gen, sleeps = client(server.url)
        assert gen.generate("a grounded prompt", [OK_IMAGE]) == OK_IMAGE
    assert server.count == 3
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0
    path, body = server.requests[0]
    assert path == "/generate" and body["image_urls"][0].startswith("data:image/png;base64,")
    assert {k: body[k] for k in ("seed", "true_cfg_scale", "negative_prompt", "num_inference_steps")} == {
        "seed": 0, "true_cfg_scale": 4.0, "negative_prompt": " ", "num_inference_steps": 40,
    }


def test_a_timed_out_call_is_retried():
    with LoopbackServer(scripted([Reply(200, OK.body, delay_s=1.0), OK])) as server:
        gen, sleeps = client(server.url, timeout_s=0.3)
        assert gen.generate("p", []) == OK_IMAGE
    assert server.count == 2 and len(sleeps) == 1


def test_retries_are_bounded_and_the_error_tells_what_happened():
    with LoopbackServer(scripted([Reply(500, {"detail": "CUDA error: device-side assert"})])) as server:
        gen, sleeps = client(server.url, attempts=3)
        with pytest.raises(ServiceUnavailable) as info:
            gen.generate("p", [])
    assert server.count == 3 and len(sleeps) == 2
    message = str(info.value)
    assert "gave up after 3 attempt(s)" in message and "retry budget spent" in message
    assert f"HTTP 500 from {server.url}/generate: CUDA error: device-side assert" in message
    assert len(info.value.history) == 3


def test_a_refused_connection_is_retried_then_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    gen, sleeps = client(f"http://127.0.0.1:{port}", attempts=2)
    with pytest.raises(ServiceUnavailable, match=rf"ConnectError at http://127.0.0.1:{port}/generate"):
        gen.generate("p", [])
    assert len(sleeps) == 1


def test_the_deadline_cuts_retries_short():
    http = HttpSettings(retry=RetryPolicy(max_attempts=10, backoff_base_s=5.0, deadline_s=1.0))
    with LoopbackServer(scripted([Reply(503, {"detail": "busy"})])) as server:
        gen = ImageServerClient(server.url, http=http, sleep=lambda s: None)
        with pytest.raises(ServiceUnavailable, match=r"gave up after 1 attempt\(s\).*deadline of 1 s reached"):
            gen.generate("p", [])
    assert server.count == 1


def test_a_4xx_is_not_retried_and_names_the_server_detail():
    with LoopbackServer(scripted([Reply(400, {"detail": "too many reference images: 4 > max_reference_images=3"})])) as server:
        gen, sleeps = client(server.url)
        with pytest.raises(RequestRejected, match="HTTP 400 .* too many reference images") as info:
            gen.generate("p", [OK_IMAGE] * 4)
    assert info.value.status == 400 and server.count == 1 and sleeps == []


def test_success_false_and_unusable_images_are_generation_failures_without_retry():
    failing = Reply(200, {"success": False, "message": "Inference failed: OOM"})
    with LoopbackServer(scripted([failing])) as server:
        gen, _ = client(server.url)
        with pytest.raises(GenerationFailed, match="Inference failed: OOM"):
            gen.generate("p", [])
    assert server.count == 1
    garbage = Reply(200, {"success": True, "image": base64.b64encode(b"not an image").decode()})
    with LoopbackServer(scripted([garbage])) as server, pytest.raises(GenerationFailed, match="image is unusable"):
        client(server.url)[0].generate("p", [])
    empty = Reply(200, {"success": True, "image": ""})
    with LoopbackServer(scripted([empty])) as server, pytest.raises(GenerationFailed, match="carries no image"):
        client(server.url)[0].generate("p", [])


def test_a_data_prefix_is_stripped_and_all_images_are_returned():
    prefixed = "data:image/png;base64," + base64.b64encode(OK_IMAGE).decode()
    other = base64.b64encode(encoded_image((1, 1, 1))).decode()
    with LoopbackServer(scripted([Reply(200, {"success": True, "image": prefixed, "images": [prefixed, other]})])) as server:
        images = client(server.url)[0].generate_images("p", [], GenerationOptions(num_images_per_prompt=2))
        assert server.requests[0][1]["num_images_per_prompt"] == 2
    assert images[0] == OK_IMAGE and pixel(images[1]) == (1, 1, 1)


def test_a_failing_server_is_avoided_on_the_retry():
    with LoopbackServer(scripted([Reply(500, {"detail": "broken"})])) as bad, LoopbackServer(
        lambda path, body: image_server_reply(body)
    ) as good:
        for seed in range(6):
            gen, _ = client([bad.url, good.url], attempts=2, seed=seed)
            assert pixel(gen.generate("p", [OK_IMAGE]))[0] == 10  # the good server's reply (one reference)
    # Two attempts each: whenever the first went to the bad server, the retry went to the good one.
    assert good.count == 6 and 0 < bad.count < 6


def test_server_slots_bound_requests_per_url_and_overall():
    slots = ServerSlots(["http://a", "http://b"], per_url=1, total=2, rng=random.Random(0))
    peak: dict[str, int] = {"http://a": 0, "http://b": 0, "all": 0}
    lock = threading.Lock()

    def work() -> None:
        with slots.take() as url:
            with lock:
                now = slots.in_flight()
                peak[url] = max(peak[url], now[url])
                peak["all"] = max(peak["all"], sum(now.values()))
            time.sleep(0.02)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == {"http://a": 1, "http://b": 1, "all": 2}
    assert slots.in_flight() == {"http://a": 0, "http://b": 0}


def test_requests_are_checked_before_they_are_sent():
    gen = ImageServerClient("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="reference image 1: not a recognisable image"):
        gen.payload("p", [OK_IMAGE, b"\x00\x01garbage"])
    with pytest.raises(ValidationError, match="num_inference_steps"):
        GenerationOptions(num_inference_steps=0)
    assert backoff_s(1, RetryPolicy(backoff_cap_s=10), random.Random(0), hint_s=30) == 10  # Retry-After, capped


def test_urls_parse_like_upstreams_environment_variable():
    assert parse_urls('["http://a:8000/", "http://b:8000"]') == ("http://a:8000", "http://b:8000")
    assert parse_urls("http://a:8000, http://b:8000") == ("http://a:8000", "http://b:8000")
    with pytest.raises(ValueError, match="must start with http"):
        parse_urls("a:8000")
    with pytest.raises(ValueError, match="no image-generator URL"):
        parse_urls(" , ")


def test_the_backend_is_chosen_by_config():
    config = ImageGenConfig.from_mapping(
        {"urls": ["http://gpu1:8001", "http://gpu2:8001"], "options": {"num_inference_steps": 8},
         "http": {"timeout_s": 60, "retry": {"max_attempts": 5}}}
    )
    server = make_image_generator(config)
    assert isinstance(server, ImageServerClient) and server.urls == ("http://gpu1:8001", "http://gpu2:8001")
    assert server.options.num_inference_steps == 8 and server.http.retry.max_attempts == 5

    openai = make_image_generator(
        ImageGenConfig(backend="openai", urls=("https://api.example/v1",), size="1024x1024"),
        env={"OPENAI_API_KEY": "sk-test"},
    )
    assert isinstance(openai, OpenAIImagesClient)
    assert (openai.base_url, openai.api_key, openai.size) == ("https://api.example/v1", "sk-test", "1024x1024")

    from_env = ImageGenConfig.from_env(
        {"QWEN_EDIT_APP_URL": '["http://h1:8001","http://h2:8001"]', "GEN_API_CONCURRENCY": "32",
         "GEN_IMAGE_TIMEOUT": "900"}
    )
    assert from_env.urls == ("http://h1:8001", "http://h2:8001")
    assert (from_env.max_concurrency, from_env.http.timeout_s) == (32, 900.0)

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['timeout'\]"):
        ImageGenConfig.from_mapping({"timeout": 3})
    with pytest.raises(ValueError, match=r"http.retry: unknown key\(s\) \['tries'\]"):
        ImageGenConfig.from_mapping({"http": {"retry": {"tries": 3}}})
    with pytest.raises(ValueError, match="unknown image backend 'gemini'"):
        ImageGenConfig(backend="gemini")
