"""A second image backend: any OpenAI-compatible image API (OpenAI gpt-image-1, or a local server that
speaks the same protocol). Text-only prompts go to `POST {base}/images/generations` (JSON); prompts with
references go to `POST {base}/images/edits` (multipart, one `image` part, or `image[]` parts for several,
as the openai SDK sends them). Spoken with httpx so retries and errors follow `transport` like the image
server's client."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from gsjax.httputil import BadJSONReply, OwnsHttpClient, reply_json
from gsjax.imagegen.client import decode_reply_image, parse_urls
from gsjax.imagegen.dataurl import DataUrlError, image_mime
from gsjax.imagegen.transport import GenerationFailed, HttpSettings, send_with_retries


def reference_parts(images: Sequence[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart file parts for the references: `image` for one, `image[]` for several; a bad one is
    named by its index."""
    name = "image" if len(images) == 1 else "image[]"
    parts = []
    for index, data in enumerate(images):
        try:
            mime = image_mime(data)
        except DataUrlError as exc:
            raise ValueError(f"reference image {index}: {exc}") from None
        parts.append((name, (f"reference_{index}.{mime.split('/', 1)[1]}", data, mime)))
    return parts


def first_image_entry(reply: object, source: str) -> Mapping[str, Any]:
    """`data[0]` of an images reply; `GenerationFailed` when the reply holds no image."""
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise GenerationFailed(f"{source}: the reply has no data[0] image entry: {str(reply)[:200]}")
    return data[0]


@dataclass
class OpenAIImagesClient(OwnsHttpClient):
    """`generate(prompt, references) -> image bytes` over an OpenAI-compatible images API. `size` and
    `quality` are sent only when set (the API's defaults otherwise); `extra` adds body fields such as
    `output_format` or `background`."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-image-1"
    api_key: str = ""
    size: str | None = None
    quality: str | None = None
    extra: Mapping[str, str | int | float] = field(default_factory=dict)
    max_concurrency: int = 10
    http: HttpSettings = field(default_factory=HttpSettings)
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    transport: httpx.BaseTransport | None = None

    def __post_init__(self) -> None:
        (self.base_url,) = parse_urls([self.base_url])
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        # Sent to the API only, never to the URLs of returned images.
        self._auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(timeout=self.http.timeout(), transport=self.transport)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)

    def fields(self, prompt: str) -> dict[str, str | int | float]:
        """The request fields shared by both endpoints (one image per call)."""
        body: dict[str, str | int | float] = {"model": self.model, "prompt": prompt, "n": 1}
        if self.size:
            body["size"] = self.size
        if self.quality:
            body["quality"] = self.quality
        body.update(self.extra)
        return body

    def generate(self, prompt: str, images: Sequence[bytes]) -> bytes:
        """One image for `prompt`, edited from `images` when there are any; raises an `ImageGenError`."""
        if not prompt.strip():
            raise ValueError("prompt is empty")
        body = self.fields(prompt)
        if images:
            url, parts = self.base_url + "/images/edits", reference_parts(images)
            form = {key: str(value) for key, value in body.items()}

            def send(_attempt: int) -> httpx.Response:
                return self._http.post(url, data=form, files=parts, headers=self._auth)
        else:
            url = self.base_url + "/images/generations"

            def send(_attempt: int) -> httpx.Response:
                return self._http.post(url, json=body, headers=self._auth)

        with self._slots:
            response = send_with_retries(send, self.http.retry, f"images API {url}", sleep=self.sleep, rng=self.rng)
            return self._image(response, url)

    def _image(self, response: httpx.Response, url: str) -> bytes:
        source = f"images API {url}"
        try:
            reply = reply_json(response)
        except BadJSONReply as exc:
            raise GenerationFailed(f"{source}: {exc}") from None
        entry = first_image_entry(reply, source)
        if entry.get("b64_json"):
            return decode_reply_image(entry["b64_json"], source)
        if entry.get("url"):
            return self._download(str(entry["url"]), source)
        raise GenerationFailed(f"{source}: data[0] has neither b64_json nor url")

    def _download(self, url: str, source: str) -> bytes:
        """Fetch an image the API returned by URL (older models reply with `url`)."""
        response = send_with_retries(
            lambda _attempt: self._http.get(url), self.http.retry, f"{source} image download", sleep=self.sleep, rng=self.rng
        )
        data = response.content
        try:
            image_mime(data)
        except DataUrlError as exc:
            raise GenerationFailed(f"{source}: the image at {url} is unusable ({exc})") from None
        return data
