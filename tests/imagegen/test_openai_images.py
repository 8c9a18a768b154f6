"""The OpenAI-compatible images backend against a loopback fake that speaks that API: text-only prompts
to /images/generations (JSON), references to /images/edits (multipart), b64_json or url replies,
error messages passed through, 5xx retried."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from gsjax.imagegen.client import ImageGenConfig, make_image_generator
from gsjax.imagegen.openai_images import OpenAIImagesClient
from gsjax.imagegen.transport import HttpSettings, RequestRejected, RetryPolicy
from tests.imagegen.fakes import FakeImagesApi, encoded_image
from tests.imagegen.loopback import LoopbackUvicorn

FAST_RETRY = HttpSettings(timeout_s=10, retry=RetryPolicy(max_attempts=3, backoff_base_s=0.01))


@pytest.fixture
def api() -> Iterator[tuple[FakeImagesApi, str]]:
    fake = FakeImagesApi()
    with LoopbackUvicorn(fake.app()) as server:
        yield fake, server.url + "/v1"


def make_client(base_url: str, **kw) -> OpenAIImagesClient:
    return OpenAIImagesClient(base_url, api_key="sk-test", http=FAST_RETRY, rng=random.Random(0), **kw)


def test_text_only_prompt_goes_to_generations_as_json(api):
    fake, base_url = api
    image = make_client(base_url, size="1024x1024", quality="high").generate("a lighthouse at dusk", [])
    assert image == fake.image
    (request,) = fake.requests
    assert request["path"] == "generations"
    assert request["fields"] == {"model": "gpt-image-1", "prompt": "a lighthouse at dusk", "n": 1,
                                 "size": "1024x1024", "quality": "high"}
    assert request["headers"]["authorization"] == "Bearer sk-test"


def test_references_go_to_edits_as_multipart_image_parts(api):
    fake, base_url = api
    refs = [encoded_image((255, 0, 0)), encoded_image((0, 0, 255), fmt="JPEG")]
    assert make_client(base_url, extra={"output_format": "png"}).generate("the car before the house", refs) == fake.image
    (request,) = fake.requests
    assert request["path"] == "edits"
    assert request["fields"] == {"model": "gpt-image-1", "prompt": "the car before the house", "n": "1",
                                 "output_format": "png"}
    assert [(f["name"], f["filename"], f["content_type"]) for f in request["files"]] == [
        ("image[]", "reference_0.png", "image/png"),
        ("image[]", "reference_1.jpeg", "image/jpeg"),
    ]
    assert [f["data"] for f in request["files"]] == refs

    make_client(base_url).generate("one reference", refs[:1])
    assert [f["name"] for f in fake.requests[-1]["files"]] == ["image"]  # a single image is sent as `image`


def test_url_replies_are_downloaded_without_the_api_key():
    fake = FakeImagesApi(reply_with_url=True)
    with LoopbackUvicorn(fake.app()) as server:
        assert make_client(server.url + "/v1").generate("p", []) == fake.image
    download = fake.requests[-1]
    assert download["path"] == "download" and "authorization" not in download["headers"]


def test_5xx_is_retried_and_api_errors_are_passed_through(api):
    fake = FakeImagesApi(fail_first=2)
    with LoopbackUvicorn(fake.app()) as server:
        assert make_client(server.url + "/v1").generate("p", []) == fake.image
    assert len(fake.requests) == 3

    _, base_url = api
    with pytest.raises(RequestRejected, match="HTTP 400 .*rejected by the safety system") as info:
        make_client(base_url).generate("refuse", [])
    assert info.value.status == 400
    with pytest.raises(ValueError, match="reference image 0: not a recognisable image"):
        make_client(base_url).generate("p", [b"not an image"])
    with pytest.raises(ValueError, match="prompt is empty"):
        make_client(base_url).generate("  ", [])


def test_selected_by_config_with_the_key_from_the_environment(api):
    fake, base_url = api
    config = ImageGenConfig.from_mapping({"backend": "openai", "urls": [base_url], "model": "gpt-image-1.5",
                                          "api_key_env": "MY_IMAGES_KEY"})
    generator = make_image_generator(config, env={"MY_IMAGES_KEY": "sk-from-env"})
    assert generator.generate("p", [encoded_image((1, 2, 3))]) == fake.image
    assert fake.requests[0]["fields"]["model"] == "gpt-image-1.5"
    assert fake.requests[0]["headers"]["authorization"] == "Bearer sk-from-env"
