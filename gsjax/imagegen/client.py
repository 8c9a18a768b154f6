"""Clients of image generators, behind the one interface the reward and KnowGen use
(`generate(prompt, reference_images) -> image bytes`), and the config that picks the backend:

- `server`: the gsjax/upstream image server (`POST /generate`, agent.md §6.1), over one or more URLs with
  upstream's server choice (§6.3): shuffled URLs, 8 requests in flight per URL, a global limit on top.
- `openai`: an OpenAI-compatible image API (`/images/generations`, `/images/edits`), see `openai_images`.

Both retry transient failures with backoff (`transport.RetryPolicy`) and raise `transport.ImageGenError`
subclasses whose messages name the URL and the cause.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import httpx

from gsjax.httputil import BadJSONReply, OwnsHttpClient, json_object
from gsjax.imagegen.dataurl import (
    DataUrlError,
    decode_image_payload,
    image_mime,
    to_data_url,
)
from gsjax.imagegen.schema import GenerateRequest, GenerationOptions
from gsjax.imagegen.transport import (
    AttemptFailed,
    GenerationFailed,
    HttpSettings,
    ImageGenError,
    RetryPolicy,
    ServiceUnavailable,
    check_response,
    send_with_retries,
)

BACKENDS = ("server", "openai")


class ImageGenerator(Protocol):
    """What callers need from any backend."""

    def generate(self, prompt: str, images: Sequence[bytes]) -> bytes:
        """The first generated image (encoded bytes) for `prompt` conditioned on `images`."""


def parse_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """Server URLs from a list, a JSON array or a comma-separated string (upstream `QWEN_EDIT_APP_URL`),
    trailing slashes dropped; each must be http(s)."""
    if isinstance(value, str):
        text = value.strip()
        items = json.loads(text) if text.startswith("[") else text.split(",")
    else:
        items = list(value)
    urls = tuple(str(item).strip().rstrip("/") for item in items if str(item).strip())
    if not urls:
        raise ValueError(f"no image-generator URL given (got {value!r})")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"image-generator URL must start with http:// or https://, got {url!r}")
    return urls


def reference_data_urls(images: Sequence[bytes]) -> list[str]:
    """Each reference as a `data:image/<fmt>;base64,` URL (format sniffed from the bytes); a bad one is
    named by its index."""
    urls = []
    for index, data in enumerate(images):
        try:
            urls.append(to_data_url(data))
        except DataUrlError as exc:
            raise ValueError(f"reference image {index}: {exc}") from None
    return urls


def decode_reply_image(payload: object, source: str) -> bytes:
    """Image bytes from a base64 reply field, checked to be an image; `GenerationFailed` otherwise."""
    if not isinstance(payload, str) or not payload.strip():
        raise GenerationFailed(f"{source}: the reply carries no image")
    try:
        data = decode_image_payload(payload)
        image_mime(data)
    except DataUrlError as exc:
        raise GenerationFailed(f"{source}: the reply image is unusable ({exc})") from None
    return data


class ServerSlots:
    """Which server the next request goes to: URLs in a fresh random order, the first with a free slot
    (`per_url` in flight each), at most `total` in flight overall; callers wait when none is free.
    `avoid` (the URL that just failed) is tried last."""

    def __init__(self, urls: Sequence[str], per_url: int, total: int, rng: random.Random) -> None:
        if per_url < 1 or total < 1:
            raise ValueError(f"concurrency limits must be >= 1, got per_url={per_url}, total={total}")
        self.urls, self.per_url, self.total, self._rng = tuple(urls), per_url, total, rng
        self._in_flight = dict.fromkeys(self.urls, 0)
        self._cond = threading.Condition()

    def in_flight(self) -> dict[str, int]:
        with self._cond:
            return dict(self._in_flight)

    def _pick(self, avoid: str | None) -> str | None:
        if sum(self._in_flight.values()) >= self.total:
            return None
        order = self._rng.sample(self.urls, len(self.urls))
        order.sort(key=lambda url: url == avoid)
        return next((url for url in order if self._in_flight[url] < self.per_url), None)

    @contextmanager
    def take(self, avoid: str | None = None) -> Iterator[str]:
        with self._cond:
            url = self._pick(avoid)
            while url is None:
                self._cond.wait()
                url = self._pick(avoid)
            self._in_flight[url] += 1
        try:
            yield url
        finally:
            with self._cond:
                self._in_flight[url] -= 1
                self._cond.notify_all()


@dataclass
class ImageServerClient(OwnsHttpClient):
    """Client of one or more image servers (agent.md §6.1). `urls`: one URL, a comma list, a JSON array or
    a sequence. `options` are sent with every request (upstream defaults: seed 0, 40 steps, CFG 4.0)."""

    urls: str | Sequence[str]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    path: str = "/generate"
    per_url_concurrency: int = 8
    max_concurrency: int = 20
    http: HttpSettings = field(default_factory=HttpSettings)
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    transport: httpx.BaseTransport | None = None

    def __post_init__(self) -> None:
        self.urls = parse_urls(self.urls)
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        self._slots = ServerSlots(self.urls, self.per_url_concurrency, self.max_concurrency, self.rng)
        self._http = httpx.Client(
            timeout=self.http.timeout(),
            limits=httpx.Limits(max_connections=self.max_concurrency + len(self.urls)),
            transport=self.transport,
        )

    def payload(self, prompt: str, images: Sequence[bytes], options: GenerationOptions | None = None) -> dict[str, Any]:
        """The `/generate` body, validated by the server's own schema before it is sent."""
        opts = (options or self.options).model_dump()
        request = GenerateRequest(prompt=prompt, image_urls=reference_data_urls(images), **opts)
        return request.model_dump(exclude_none=True)

    def generate_images(
        self, prompt: str, images: Sequence[bytes], options: GenerationOptions | None = None
    ) -> list[bytes]:
        """Every image of one generation (`num_images_per_prompt` of them), PNG bytes."""
        body = self.payload(prompt, images, options)
        last_url: list[str | None] = [None]

        def send(_attempt: int) -> httpx.Response:
            with self._slots.take(avoid=last_url[0]) as url:
                last_url[0] = url
                return self._http.post(url + self.path, json=body)

        response = send_with_retries(send, self.http.retry, "image server", sleep=self.sleep, rng=self.rng)
        return self._images(response)

    def generate(self, prompt: str, images: Sequence[bytes]) -> bytes:
        """The first generated image (PNG bytes); raises an `ImageGenError` on failure."""
        return self.generate_images(prompt, images)[0]

    def _images(self, response: httpx.Response) -> list[bytes]:
        source = f"image server {response.request.url}"
        try:
            reply = json_object(response)
        except BadJSONReply as exc:
            raise GenerationFailed(f"{source}: {exc}") from None
        if reply.get("success") is not True:
            raise GenerationFailed(f"{source}: {reply.get('message') or 'success is not true and there is no message'}")
        payloads = reply.get("images") or [reply.get("image")]
        return [decode_reply_image(p, source) for p in payloads]

    def health(self) -> dict[str, dict[str, Any]]:
        """Each server's `/health` reply; an unreachable or broken one reads `{"status": "unreachable", ...}`."""
        replies = {}
        for url in self.urls:
            try:
                replies[url] = check_response(self._http.get(url + "/health", timeout=10.0), "health").json()
            except (ImageGenError, AttemptFailed, httpx.HTTPError, ValueError) as exc:
                replies[url] = {"status": "unreachable", "reason": f"{type(exc).__name__}: {exc}"}
        return replies

    def wait_until_healthy(self, timeout_s: float, interval_s: float = 1.0) -> None:
        """Block until every server reports healthy; `ServiceUnavailable` names the ones that did not."""
        deadline = time.monotonic() + timeout_s
        while True:
            replies = self.health()
            sick = {url: r for url, r in replies.items() if r.get("status") != "healthy"}
            if not sick:
                return
            if time.monotonic() + interval_s > deadline:
                detail = "; ".join(f"{url}: {r.get('status')} ({r.get('reason')})" for url, r in sick.items())
                raise ServiceUnavailable(f"image servers not healthy within {timeout_s:g} s: {detail}", ())
            self.sleep(interval_s)


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ImageGenConfig:
    """Which backend to call and how. `urls`: the servers (`server`) or the API base URL, e.g.
    `https://api.openai.com/v1` (`openai`, first URL). The API key is read from the environment variable
    named by `api_key_env`, so configs never hold secrets."""

    backend: str = "server"
    urls: tuple[str, ...] = ("http://127.0.0.1:8000",)
    path: str = "/generate"
    per_url_concurrency: int = 8
    max_concurrency: int = 20
    options: GenerationOptions = field(default_factory=GenerationOptions)
    model: str = "gpt-image-1"
    api_key_env: str = "OPENAI_API_KEY"
    size: str | None = None
    quality: str | None = None
    http: HttpSettings = field(default_factory=HttpSettings)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown image backend {self.backend!r}; choose one of {BACKENDS}")
        object.__setattr__(self, "urls", parse_urls(self.urls))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ImageGenConfig:
        """From a config file's mapping; `options`, `http` and `http.retry` are nested mappings. Unknown keys
        are an error naming them."""
        data = dict(data)
        _reject_unknown(data, {f.name for f in fields(cls)}, "image generator config")
        if "options" in data:
            data["options"] = GenerationOptions.model_validate(data["options"])
        if "http" in data:
            http = dict(data["http"])
            _reject_unknown(http, {f.name for f in fields(HttpSettings)}, "image generator config http")
            if "retry" in http:
                retry = dict(http["retry"])
                _reject_unknown(retry, {f.name for f in fields(RetryPolicy)}, "image generator config http.retry")
                http["retry"] = RetryPolicy(**retry)
            data["http"] = HttpSettings(**http)
        return cls(**data)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ImageGenConfig:
        """Upstream's variables: `QWEN_EDIT_APP_URL` (JSON array or comma list), `QWEN_EDIT_APP_PATH`,
        `GEN_API_CONCURRENCY`, `GEN_IMAGE_TIMEOUT`; plus `GSJAX_IMAGEGEN_BACKEND` and, for `openai`,
        `GSJAX_IMAGEGEN_MODEL`. Explicit overrides win."""
        env = os.environ if env is None else env
        base = cls()
        values: dict[str, Any] = {
            "backend": env.get("GSJAX_IMAGEGEN_BACKEND", base.backend),
            "urls": env.get("QWEN_EDIT_APP_URL") or base.urls,
            "path": env.get("QWEN_EDIT_APP_PATH", base.path),
            "max_concurrency": int(env.get("GEN_API_CONCURRENCY", base.max_concurrency)),
            "model": env.get("GSJAX_IMAGEGEN_MODEL", base.model),
        }
        if "GEN_IMAGE_TIMEOUT" in env:
            values["http"] = replace(base.http, timeout_s=float(env["GEN_IMAGE_TIMEOUT"]))
        return cls(**{**values, **overrides})


def _reject_unknown(data: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def make_image_generator(
    config: ImageGenConfig, env: Mapping[str, str] | None = None, **client_kwargs: Any
) -> ImageGenerator:
    """The backend `config` names; `client_kwargs` (sleep, rng, transport) are passed through."""
    if config.backend == "server":
        return ImageServerClient(
            config.urls,
            options=config.options,
            path=config.path,
            per_url_concurrency=config.per_url_concurrency,
            max_concurrency=config.max_concurrency,
            http=config.http,
            **client_kwargs,
        )
    from gsjax.imagegen.openai_images import OpenAIImagesClient

    env = os.environ if env is None else env
    return OpenAIImagesClient(
        config.urls[0],
        model=config.model,
        api_key=env.get(config.api_key_env, ""),
        size=config.size,
        quality=config.quality,
        max_concurrency=config.max_concurrency,
        http=config.http,
        **client_kwargs,
    )
