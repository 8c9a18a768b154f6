"""Tiny random diffusers pipelines (built once per session, offline) and loopback servers around them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from gsjax.imagegen.client import ImageServerClient
from gsjax.imagegen.pipelines import DiffusersPipelineFactory
from gsjax.imagegen.references import ImageLimits
from gsjax.imagegen.server import ServerConfig, create_app
from gsjax.imagegen.tiny import build_tiny_pipeline, tiny_spec
from gsjax.imagegen.worker import DevicePool, HealthPolicy
from tests.imagegen.loopback import LoopbackUvicorn

MAX_BODY_BYTES = 64 * 1024
MAX_IMAGE_PIXELS = 100_000


@pytest.fixture(scope="session")
def tiny_edit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "qwen-image-edit-plus", "edit-plus")


@pytest.fixture(scope="session")
def tiny_text_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "qwen-image", "text")


def serve_pipeline(path: Path, reference_vae_area: int | None = None) -> LoopbackUvicorn:
    """A loopback server for a tiny pipeline folder on the CPU, with small body and image limits."""
    spec = dataclasses.replace(tiny_spec(path), reference_vae_area=reference_vae_area)
    pool = DevicePool(DiffusersPipelineFactory(spec), ["cpu"], HealthPolicy(poll_interval_s=0.05))
    config = ServerConfig(max_body_bytes=MAX_BODY_BYTES, images=ImageLimits(max_pixels=MAX_IMAGE_PIXELS))
    return LoopbackUvicorn(create_app(pool, config))


@pytest.fixture(scope="session")
def edit_server(tiny_edit_path: Path) -> Iterator[LoopbackUvicorn]:
    """The edit pipeline VAE-encodes each reference at a fixed 1024x1024 area (a module constant): seconds
    per reference on a CPU even for the tiny VAE. Served with reference_vae_area 64x64 (the demo's option) so a
    call takes well under a second; every code path stays the same. The constant is restored afterwards."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "VAE_IMAGE_SIZE", module.VAE_IMAGE_SIZE)  # restored when the session ends
        with serve_pipeline(tiny_edit_path, reference_vae_area=64 * 64) as server:
            ImageServerClient(server.url).wait_until_healthy(60, interval_s=0.05)
            assert module.VAE_IMAGE_SIZE == 64 * 64
            yield server


@pytest.fixture(scope="session")
def text_server(tiny_text_path: Path) -> Iterator[LoopbackUvicorn]:
    with serve_pipeline(tiny_text_path) as server:
        ImageServerClient(server.url).wait_until_healthy(60, interval_s=0.05)
        yield server
