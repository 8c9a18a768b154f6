"""End to end over real HTTP: tiny random diffusers pipelines (Qwen-Image-Edit-Plus with references,
Qwen-Image text-only) served by the gsjax image server, called with raw HTTP and with the client."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
from PIL import Image

from gsjax.imagegen.client import ImageServerClient
from gsjax.imagegen.dataurl import to_data_url
from gsjax.imagegen.schema import GenerationOptions
from tests.imagegen.fakes import encoded_image

FAST = {"num_inference_steps": 1}


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.size


def test_edit_pipeline_answers_the_upstream_schema_with_a_png(edit_server):
    health = httpx.get(edit_server.url + "/health").json()
    assert (health["status"], health["num_gpus"], health["disabled_gpus"], health["queued"]) == ("healthy", 1, [], 0)

    refs = [encoded_image((200, 30, 30), (40, 30)), encoded_image((20, 30, 220), (30, 40), fmt="JPEG")]
    body = {"prompt": "the red car in front of the blue house", "image_urls": [to_data_url(r) for r in refs], **FAST}
    reply = httpx.post(edit_server.url + "/generate", json=body, timeout=120)
    assert reply.status_code == 200
    payload = reply.json()
    assert set(payload) == {"success", "image"} and payload["success"] is True
    assert not payload["image"].startswith("data:")
    assert png_size(base64.b64decode(payload["image"])) == (64, 64)  # the tiny spec's call defaults


def test_text_pipeline_queues_concurrent_requests_and_is_deterministic_per_seed(text_server):
    client = ImageServerClient(text_server.url)
    seeds = [0, 0, 1]
    results: dict[int, bytes] = {}
    queued_seen: list[int] = []

    def call(i: int) -> None:
        options = GenerationOptions(seed=seeds[i], num_inference_steps=3)  # long enough to overlap
        results[i] = client.generate_images("a lighthouse at dusk", [], options)[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(seeds))]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        queued_seen.append(httpx.get(text_server.url + "/health").json()["queued"])
        time.sleep(0.02)
    for thread in threads:
        thread.join()

    assert max(queued_seen) >= 1  # some requests waited in the server's queue
    assert httpx.get(text_server.url + "/health").json()["queued"] == 0
    assert sorted(results) == [0, 1, 2]
    assert results[0] == results[1]  # same prompt and seed -> same image
    assert results[0] != results[2]
    assert png_size(results[0]) == (64, 64)


def test_several_images_per_prompt_come_back_in_images(text_server):
    options = GenerationOptions(num_images_per_prompt=2, **FAST)
    images = ImageServerClient(text_server.url, options=options).generate_images("two lighthouses", [])
    assert len(images) == 2 and all(png_size(img) == (64, 64) for img in images)
