"""`gsjax serve-image`: serve a local diffusers pipeline behind the image-generator API (agent.md §6).

Mounted by the top-level CLI as `app.command("serve-image")(serve_image)`. Only typer is imported at
module level; torch, diffusers, FastAPI and uvicorn load when the command runs, so `gsjax --help` stays
fast. Options are checked (folder, class, dtype, devices) before anything heavy starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from fastapi import FastAPI

IMAGE_INPUT_CHOICES = ("required", "optional", "none")


def parse_devices(values: list[str] | None) -> list[str] | None:
    """Device names from repeated and/or comma-separated `--device` values; None (or `auto`) means every
    CUDA device, else the CPU."""
    names = [name.strip() for value in values or [] for name in value.split(",") if name.strip()]
    if not names or names == ["auto"]:
        return None
    if "auto" in names:
        raise typer.BadParameter("'auto' cannot be combined with explicit devices", param_hint="--device")
    if len(set(names)) != len(names):
        raise typer.BadParameter(f"devices repeat: {names}", param_hint="--device")
    return names


def check_devices(devices: list[str]) -> None:
    """Each name must parse as a torch device, and CUDA ones must exist."""
    import torch

    for name in devices:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise typer.BadParameter(f"{name!r} is not a torch device ({exc})", param_hint="--device") from None
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise typer.BadParameter(
                f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) visible", param_hint="--device"
            )


def build_app(
    pipeline_path: Path,
    *,
    pipeline_class: str | None = None,
    devices: list[str] | None = None,
    dtype: str = "auto",
    image_input: str | None = None,
    height: int | None = None,
    width: int | None = None,
    reference_vae_area: int | None = None,
    max_reference_images: int = 3,
    max_body_bytes: int = 64 * 2**20,
    max_image_pixels: int = 40_000_000,
    allow_url_images: bool = True,
    infer_timeout_s: float = 1800.0,
    wait_timeout_s: float = 6000.0,
    max_queue: int = 1024,
    fail_threshold: int = 3,
    cooldown_s: float = 300.0,
) -> FastAPI:
    """The server app for a pipeline folder, every option checked; `typer.BadParameter` names a bad one."""
    from gsjax.imagegen import pipelines
    from gsjax.imagegen.references import ImageLimits
    from gsjax.imagegen.server import ServerConfig, create_app
    from gsjax.imagegen.worker import DevicePool, HealthPolicy

    if image_input is not None and image_input not in IMAGE_INPUT_CHOICES:
        raise typer.BadParameter(f"choose one of {IMAGE_INPUT_CHOICES}, got {image_input!r}", param_hint="--image-input")
    call_defaults = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    spec = pipelines.PipelineSpec(
        path=Path(pipeline_path),
        class_name=pipeline_class,
        dtype=dtype,
        image_input=pipelines.ImageInput(image_input) if image_input else None,
        call_defaults=call_defaults,
        reference_vae_area=reference_vae_area,
    )
    try:
        cls = pipelines.pipeline_class(pipelines.resolve_class_name(spec))
    except (OSError, ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--pipeline-path / --pipeline-class") from None
    if reference_vae_area is not None:
        try:
            pipelines.set_reference_vae_area(cls, reference_vae_area)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--reference-vae-area") from None
    devices = devices or pipelines.available_devices()
    check_devices(devices)
    try:
        pipelines.resolve_dtype(dtype, devices[0])
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--dtype") from None
    try:
        policy = HealthPolicy(
            fail_threshold=fail_threshold,
            cooldown_s=cooldown_s,
            infer_timeout_s=infer_timeout_s,
            wait_timeout_s=wait_timeout_s,
            max_queue=max_queue,
        )
        config = ServerConfig(
            max_body_bytes=max_body_bytes,
            max_reference_images=max_reference_images,
            images=ImageLimits(max_pixels=max_image_pixels, allow_urls=allow_url_images),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return create_app(DevicePool(pipelines.DiffusersPipelineFactory(spec), devices, policy), config)


def serve_image(
    pipeline_path: Annotated[
        Path, typer.Option("--pipeline-path", help="Local diffusers pipeline folder (has model_index.json).")
    ],
    pipeline_class: Annotated[
        str | None,
        typer.Option(help="diffusers pipeline class, e.g. QwenImageEditPlusPipeline; default: model_index.json's."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    device: Annotated[
        list[str] | None,
        typer.Option(help="Device(s), repeated or comma-separated (cuda:0,cuda:1 or cpu); one pipeline and "
                          "one request at a time each. Default: every CUDA device, else the CPU."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="torch dtype; auto = bfloat16 on accelerators, float32 on CPU.")] = "auto",
    image_input: Annotated[
        str | None,
        typer.Option(help="Reference images: required | optional | none. Default: from the pipeline's signature."),
    ] = None,
    height: Annotated[int | None, typer.Option(help="Output height when a request sets none.")] = None,
    width: Annotated[int | None, typer.Option(help="Output width when a request sets none.")] = None,
    reference_vae_area: Annotated[int | None, typer.Option(
        help="Pixels at which each reference is VAE-encoded (Qwen-Image-Edit-Plus: 1024*1024 by default). "
             "For tiny test pipelines on a CPU; the real model expects its default.")] = None,
    max_reference_images: Annotated[int, typer.Option(help="More image_urls than this is a 400.")] = 3,
    max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies are a 413.")] = 64 * 2**20,
    max_image_pixels: Annotated[int, typer.Option(help="Larger reference images are a 400.")] = 40_000_000,
    allow_url_images: Annotated[
        bool, typer.Option(help="Fetch http(s) image_urls (off: only data: URLs).")
    ] = True,
    infer_timeout: Annotated[float, typer.Option(help="Seconds per pipeline call before a 504.")] = 1800.0,
    wait_timeout: Annotated[float, typer.Option(help="Seconds a request waits for a device before a 503.")] = 6000.0,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond this are a 503 at once.")] = 1024,
    fail_threshold: Annotated[int, typer.Option(help="Consecutive failures that disable a device.")] = 3,
    cooldown: Annotated[float, typer.Option(help="Seconds a disabled device waits before it is reloaded.")] = 300.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve a diffusers image pipeline: POST /generate (agent.md §6.1 schema), GET /health."""
    import uvicorn

    app = build_app(
        pipeline_path,
        pipeline_class=pipeline_class,
        devices=parse_devices(device),
        dtype=dtype,
        image_input=image_input,
        height=height,
        width=width,
        reference_vae_area=reference_vae_area,
        max_reference_images=max_reference_images,
        max_body_bytes=max_body_bytes,
        max_image_pixels=max_image_pixels,
        allow_url_images=allow_url_images,
        infer_timeout_s=infer_timeout,
        wait_timeout_s=wait_timeout,
        max_queue=max_queue,
        fail_threshold=fail_threshold,
        cooldown_s=cooldown,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
