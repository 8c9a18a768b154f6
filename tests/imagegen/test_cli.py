"""`serve-image` as the top-level CLI will mount it: options checked up front with errors naming the
option, and a good invocation serves the folder's pipeline."""

from __future__ import annotations

import httpx
import pytest
import typer
from typer.testing import CliRunner

from gsjax.imagegen.cli import parse_devices, serve_image
from gsjax.imagegen.client import ImageServerClient
from tests.imagegen.loopback import LoopbackUvicorn

app = typer.Typer()
app.command("serve-image")(serve_image)
app.command("other")(lambda: None)  # two commands, so `serve-image` is addressed by name as in gsjax


def run(*args: str):
    """Invoke with a wide terminal, so rich prints each message on one line."""
    return CliRunner().invoke(app, ["serve-image", *args], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})


def test_help_lists_the_options():
    result = run("--help")
    assert result.exit_code == 0
    for option in ("--pipeline-path", "--host", "--port", "--device", "--dtype", "--max-reference-images",
                   "--max-body-bytes", "--infer-timeout", "--max-queue", "--reference-vae-area"):
        assert option in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dtype", "float33"], "unknown torch dtype 'float33'"),
        (["--device", "tpu:0"], "'tpu:0' is not a torch device"),
        (["--device", "cuda:99"], "'cuda:99': only"),
        (["--image-input", "sometimes"], "choose one of ('required', 'optional', 'none')"),
        (["--pipeline-class", "NoSuchPipeline"], "'NoSuchPipeline' is not a diffusers pipeline class"),
        (["--max-queue", "-1"], "max_queue must be >= 0"),
        (["--reference-vae-area", "16384"], "QwenImagePipeline has no VAE_IMAGE_SIZE"),  # a text-only pipeline
    ],
)
def test_bad_options_fail_before_anything_loads(tiny_text_path, extra, message):
    result = run("--pipeline-path", str(tiny_text_path), *extra)
    assert result.exit_code == 2
    assert message in result.output


def test_a_folder_without_a_pipeline_is_refused(tmp_path):
    result = run("--pipeline-path", str(tmp_path))
    assert result.exit_code == 2 and "no model_index.json" in result.output


def test_devices_parse_from_repeats_and_commas():
    assert parse_devices(None) is None and parse_devices(["auto"]) is None
    assert parse_devices(["cuda:0,cuda:1", "cuda:2"]) == ["cuda:0", "cuda:1", "cuda:2"]
    with pytest.raises(typer.BadParameter, match="repeat"):
        parse_devices(["cpu", "cpu"])


def test_serve_image_serves_the_pipeline_folder(tiny_text_path, monkeypatch):
    started: dict = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.update(app=app, **kw))
    result = run("--pipeline-path", str(tiny_text_path), "--device", "cpu", "--port", "8123", "--host", "127.0.0.1")
    assert result.exit_code == 0, result.output
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    with LoopbackUvicorn(started["app"]) as server:
        ImageServerClient(server.url).wait_until_healthy(30, interval_s=0.05)
        health = httpx.get(server.url + "/health").json()
    assert health["num_gpus"] == 1 and health["devices"][0]["device"] == "cpu"
