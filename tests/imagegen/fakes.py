"""Test doubles for the image-generator tests: a pipeline factory whose calls can be held, failed or
slowed on demand, encoded test images, and a fake OpenAI images API (generations + multipart edits)."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from gsjax.imagegen.pipelines import ImageInput
from gsjax.imagegen.schema import GenerationParams


def encoded_image(color: tuple[int, int, int], size: tuple[int, int] = (24, 16), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def pixel(data: bytes) -> tuple[int, ...]:
    """The top-left pixel of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB").getpixel((0, 0))


@dataclass
class FakeFactory:
    """A `PipelineFactory` without torch. Each call returns solid images whose red channel is the number of
    references; prompts starting with `fail` raise, with `cuda` a device-fatal error. `gate`, when set,
    holds every call until it is opened; `delay_s` slows each call."""

    image_input: ImageInput = ImageInput.OPTIONAL
    delay_s: float = 0.0
    build_error: str | None = None
    name: str = "FakePipeline"
    gate: threading.Event | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    builds: int = 0
    max_active: int = 0
    _active: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def build(self, device: str) -> dict[str, Any]:
        if self.build_error:
            self.events.append(f"build-failed:{device}")
            raise RuntimeError(self.build_error)
        self.builds += 1
        self.events.append(f"build:{device}:{self.builds}")
        return {"device": device, "id": self.builds}

    def park(self, pipe: dict[str, Any]) -> None:
        self.events.append(f"park:{pipe['id']}")

    def restore(self, pipe: dict[str, Any], device: str) -> None:
        self.events.append(f"restore:{pipe['id']}")

    def discard(self, pipe: dict[str, Any]) -> None:
        self.events.append(f"discard:{pipe['id']}")

    def generate(self, pipe: dict[str, Any], device: str, params: GenerationParams, images: list[Any]) -> list[Any]:
        with self._lock:
            self.calls.append((device, params.prompt))
            self._active += 1
            self.max_active = max(self.max_active, self._active)
        try:
            if self.gate is not None and not self.gate.wait(timeout=30):
                raise RuntimeError("test gate never opened")
            time.sleep(self.delay_s)
            if params.prompt.startswith("fail"):
                raise RuntimeError(f"fake inference error for {params.prompt!r}")
            if params.prompt.startswith("cuda"):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            color = (len(images), params.seed % 256, pipe["id"])
            return [Image.new("RGB", (8, 8), color) for _ in range(params.num_images_per_prompt)]
        finally:
            with self._lock:
                self._active -= 1


@dataclass
class FakeImagesApi:
    """An OpenAI-compatible images API: records each request (path, headers, fields, files) and answers
    with `b64_json` (or `url` pointing at its own `/files/out.png` when `reply_with_url`), after failing
    the first `fail_first` calls with HTTP 500."""

    fail_first: int = 0
    reply_with_url: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    image: bytes = field(default_factory=lambda: encoded_image((1, 2, 3)))

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/images/generations")
        async def generations(request: Request) -> Response:
            body = await request.json()
            return self._reply(request, {"path": "generations", "fields": body, "files": []})

        @app.post("/v1/images/edits")
        async def edits(request: Request) -> Response:
            fields, files = parse_multipart(request.headers["content-type"], await request.body())
            return self._reply(request, {"path": "edits", "fields": fields, "files": files})

        @app.get("/files/out.png")
        async def download(request: Request) -> Response:
            self.requests.append({"path": "download", "headers": dict(request.headers)})
            return Response(self.image, media_type="image/png")

        return app

    def _reply(self, request: Request, record: dict[str, Any]) -> Response:
        record["headers"] = dict(request.headers)
        self.requests.append(record)
        if record["fields"].get("prompt") == "refuse":
            return JSONResponse({"error": {"message": "Your request was rejected by the safety system."}}, 400)
        if len([r for r in self.requests if r["path"] != "download"]) <= self.fail_first:
            return JSONResponse({"error": {"message": "upstream overloaded"}}, 500)
        if self.reply_with_url:
            entry = {"url": f"{request.base_url}files/out.png"}
        else:
            entry = {"b64_json": base64.b64encode(self.image).decode()}
        return JSONResponse({"created": 0, "data": [entry]})


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(text fields, file parts as {name, filename, content_type, data}) of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, str] = {}
    files: list[dict[str, Any]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        data = part.get_payload(decode=True)
        if filename is None:
            fields[name] = data.decode()
        else:
            files.append({"name": name, "filename": filename, "content_type": part.get_content_type(), "data": data})
    return fields, files


def static_images_app(images: dict[str, bytes]) -> FastAPI:
    """Serves `images` by path (`GET /<name>`); anything else is a 404."""
    app = FastAPI()

    @app.get("/{name}")
    async def get(name: str) -> Response:
        if name not in images:
            return Response("missing", status_code=404)
        return Response(images[name], media_type="image/png")

    return app
