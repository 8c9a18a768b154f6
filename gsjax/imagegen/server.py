"""The image-generator HTTP server (agent.md §6.1): `POST /generate`, `GET /health`.

Requests are checked and their images decoded before a device is taken (upstream took the GPU first), so
a bad request never holds a GPU. Status codes: 400 bad request content (blank prompt, too many,
undecodable or unfetchable images, images the pipeline cannot take), 413 oversized body, 422 schema
violation (missing prompt, unknown field, out-of-range value), 503 no healthy device free in time or the
queue is full, 504 inference timeout; an inference exception is HTTP 200 with `success: false`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from PIL import Image

from gsjax.imagegen.bodylimit import BodySizeLimit
from gsjax.imagegen.pipelines import ImageInput
from gsjax.imagegen.references import BadImage, ImageLimits, load_reference_images
from gsjax.imagegen.schema import (
    GenerateFailure,
    GenerateRequest,
    GenerateSuccess,
    HealthResponse,
)
from gsjax.imagegen.worker import (
    DevicePool,
    InferenceError,
    InferenceTimeout,
    NoDeviceAvailable,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Request limits. `max_reference_images` is gsjax's one limit (spec §8 #5, default 3)."""

    max_body_bytes: int = 64 * 2**20
    max_reference_images: int = 3
    images: ImageLimits = field(default_factory=ImageLimits)
    url_fetch_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_reference_images < 0:
            raise ValueError(f"max_reference_images must be >= 0, got {self.max_reference_images}")


def check_request(request: GenerateRequest, image_input: ImageInput, pipeline_name: str, config: ServerConfig) -> None:
    """The 400s that need no decoding: blank prompt, reference count against the limit and the pipeline."""
    if not request.prompt.strip():
        raise HTTPException(400, "prompt is empty")
    count = len(request.image_urls)
    if count > config.max_reference_images:
        raise HTTPException(
            400, f"too many reference images: {count} > max_reference_images={config.max_reference_images}"
        )
    if count == 0 and image_input is ImageInput.REQUIRED:
        raise HTTPException(
            400,
            f"{pipeline_name} needs at least one reference image in image_urls (serve a text-to-image "
            "pipeline for text-only prompts)",
        )
    if count > 0 and image_input is ImageInput.NONE:
        raise HTTPException(400, f"{pipeline_name} is text-to-image and takes no reference images")


def png_base64(image: Image.Image) -> str:
    """A PIL image as base64 PNG with no `data:` prefix (the upstream reply format)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def success_reply(images: list[Any]) -> GenerateSuccess | GenerateFailure:
    """The reply for the pipeline's output images (an empty output is a failure, not a blank success)."""
    if not images:
        return GenerateFailure(message="Inference failed: the pipeline returned no image")
    encoded = [png_base64(img) for img in images]
    return GenerateSuccess(image=encoded[0], images=encoded if len(encoded) > 1 else None)


def _json(body: GenerateSuccess | GenerateFailure) -> JSONResponse:
    return JSONResponse(body.model_dump(exclude_none=True))


def create_app(pool: DevicePool, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app around `pool`; the pool is started and closed with the app's lifespan."""
    config = config or ServerConfig()
    pipeline_name = pool.factory.name
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["http"] = httpx.AsyncClient(timeout=config.url_fetch_timeout_s, follow_redirects=True)
        await pool.start()
        try:
            yield
        finally:
            await pool.close()
            await state["http"].aclose()

    app = FastAPI(title="gsjax image generator", lifespan=lifespan)

    @app.get("/health", response_model_exclude_none=True)
    async def health() -> HealthResponse:
        return pool.health()

    @app.post("/generate", response_model=None)
    async def generate(request: GenerateRequest) -> JSONResponse:
        check_request(request, pool.factory.image_input, pipeline_name, config)
        try:
            images = await load_reference_images(request.image_urls, config.images, state["http"])
        except BadImage as exc:
            raise HTTPException(400, str(exc)) from None
        try:
            outputs = await pool.generate(request.params(), images)
        except NoDeviceAvailable as exc:
            raise HTTPException(503, str(exc)) from None
        except InferenceTimeout as exc:
            raise HTTPException(504, str(exc)) from None
        except InferenceError as exc:
            return _json(GenerateFailure(message=f"Inference failed: {exc}"))
        return _json(await asyncio.to_thread(success_reply, outputs))

    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    return app
