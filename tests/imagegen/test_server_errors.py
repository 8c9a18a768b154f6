"""Every 4xx of the image server, over real HTTP against the tiny pipelines: status and a message that
names the culprit. A bad request never reaches the pipeline (checked with a counting fake)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest

from gsjax.imagegen.dataurl import to_data_url
from gsjax.imagegen.references import ImageLimits
from gsjax.imagegen.server import ServerConfig, create_app
from gsjax.imagegen.worker import DevicePool, HealthPolicy
from tests.imagegen.conftest import MAX_BODY_BYTES, MAX_IMAGE_PIXELS
from tests.imagegen.fakes import FakeFactory, encoded_image, pixel, static_images_app
from tests.imagegen.loopback import LoopbackUvicorn

REF = to_data_url(encoded_image((9, 9, 9)))
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"plain text, not pixels").decode()


@pytest.fixture(scope="module")
def image_host() -> Iterator[LoopbackUvicorn]:
    with LoopbackUvicorn(static_images_app({"ok.png": encoded_image((1, 1, 1))})) as host:
        yield host


def post(server: LoopbackUvicorn, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/generate", json=body, timeout=60)


EDIT_SERVER_400 = [
    ({"prompt": "   ", "image_urls": [REF]}, "prompt is empty"),
    ({"prompt": "p", "image_urls": [REF] * 4}, "too many reference images: 4 > max_reference_images=3"),
    ({"prompt": "p"}, "QwenImageEditPlusPipeline needs at least one reference image"),
    ({"prompt": "p", "image_urls": None}, "QwenImageEditPlusPipeline needs at least one reference image"),
    ({"prompt": "p", "image_urls": ["data:image/png;base64,@@@"]}, "image_urls[0]: invalid base64 payload"),
    ({"prompt": "p", "image_urls": [REF, NOT_AN_IMAGE]}, "image_urls[1]: not a decodable image"),
    ({"prompt": "p", "image_urls": ["data:text/plain;base64,aGk="]}, "image_urls[0]: data URL has media type 'text/plain'"),
    ({"prompt": "p", "image_urls": ["data:image/png,rawbytes"]}, "image_urls[0]: not a base64 data URL"),
    ({"prompt": "p", "image_urls": ["file:///etc/passwd"]}, "image_urls[0]: must be a data: URL or an http(s) URL"),
    (
        {"prompt": "p", "image_urls": [to_data_url(encoded_image((0, 0, 0), (400, 300)))]},
        "image_urls[0]: 400x300 image exceeds 100000 pixels",
    ),
]


@pytest.mark.parametrize(("body", "message"), EDIT_SERVER_400, ids=[m.split(":")[0][:40] for _, m in EDIT_SERVER_400])
def test_bad_request_content_is_a_400_naming_the_culprit(edit_server, body, message):
    reply = post(edit_server, body)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["detail"]


def test_unfetchable_image_url_is_a_400(edit_server, image_host):
    reply = post(edit_server, {"prompt": "p", "image_urls": [REF, image_host.url + "/missing.png"]})
    assert reply.status_code == 400
    assert reply.json()["detail"] == f"image_urls[1]: fetching {image_host.url}/missing.png returned HTTP 404"


def test_text_to_image_pipeline_refuses_references(text_server):
    reply = post(text_server, {"prompt": "p", "image_urls": [REF]})
    assert reply.status_code == 400
    assert reply.json()["detail"] == "QwenImagePipeline is text-to-image and takes no reference images"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"image_urls": [REF]}, "prompt"),
        ({"prompt": "p", "image_urls": [REF], "num_inference_step": 3}, "num_inference_step"),
        ({"prompt": "p", "image_urls": [REF], "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "p", "image_urls": "not-a-list"}, "image_urls"),
        ({"prompt": "p", "image_urls": [REF], "seed": -1}, "seed"),
    ],
)
def test_schema_violation_is_a_422_naming_the_field(edit_server, body, field):
    reply = post(edit_server, body)
    assert reply.status_code == 422
    assert [err["loc"][-1] for err in reply.json()["detail"]] == [field]


def test_oversized_body_is_a_413_with_or_without_content_length(edit_server):
    big = {"prompt": "p", "image_urls": [REF], "negative_prompt": "x" * (MAX_BODY_BYTES + 1)}
    reply = post(edit_server, big)
    assert reply.status_code == 413
    assert f"exceeds max_body_bytes={MAX_BODY_BYTES}" in reply.json()["detail"]

    def chunks() -> Iterator[bytes]:  # streamed: no Content-Length header, chunked encoding
        yield b'{"prompt": "p", "negative_prompt": "'
        for _ in range(MAX_BODY_BYTES // 4096 + 1):
            yield b"x" * 4096
        yield b'"}'

    reply = httpx.post(edit_server.url + "/generate", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert reply.json()["detail"] == f"request body exceeds max_body_bytes={MAX_BODY_BYTES}"


def fake_server(factory: FakeFactory, limits: ImageLimits) -> LoopbackUvicorn:
    pool = DevicePool(factory, ["cpu"], HealthPolicy(poll_interval_s=0.05))
    return LoopbackUvicorn(create_app(pool, ServerConfig(max_body_bytes=MAX_BODY_BYTES, images=limits)))


def test_bad_requests_never_reach_the_pipeline():
    factory = FakeFactory()
    with fake_server(factory, ImageLimits(max_pixels=MAX_IMAGE_PIXELS)) as server:
        for body, _ in EDIT_SERVER_400[:2] + EDIT_SERVER_400[4:]:
            assert post(server, body).status_code == 400
        assert post(server, {"prompt": "p", "bogus": 1}).status_code == 422
        assert post(server, {"prompt": "p", "negative_prompt": "x" * MAX_BODY_BYTES}).status_code == 413
        assert factory.calls == []
        assert post(server, {"prompt": "p"}).status_code == 200  # the fake takes text-only prompts


def test_http_image_urls_are_fetched(image_host):
    factory = FakeFactory()
    with fake_server(factory, ImageLimits()) as server:
        reply = post(server, {"prompt": "p", "image_urls": [image_host.url + "/ok.png", REF]})
    assert reply.status_code == 200 and reply.json()["success"] is True
    assert factory.calls == [("cpu", "p")]
    assert pixel(base64.b64decode(reply.json()["image"]))[0] == 2  # the fake saw both references


def test_url_images_can_be_switched_off(image_host):
    with fake_server(FakeFactory(), ImageLimits(allow_urls=False)) as server:
        reply = post(server, {"prompt": "p", "image_urls": [image_host.url + "/ok.png"]})
    assert reply.status_code == 400
    assert "image_urls[0]: must be a data: URL (URL fetching is off)" in reply.json()["detail"]
