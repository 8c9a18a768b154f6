"""`gsjax bench layouts` and `gsjax estimate` through typer, mounted the way the top-level app mounts them."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from gsjax.bench.cli import bench_app, estimate

from .helpers import NEEDS_8

RESULT_FIELDS = {"layout", "mesh", "step_time_s", "step_times_s", "tokens_per_s", "model_flops_per_s",
                 "xla_peak_bytes", "estimate_bytes", "estimate_error", "loss"}


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(bench_app, name="bench")
    root.command()(estimate)
    return root


def small_tiny_config(path):
    """The tiny preset cut to one text layer, one vision block and a 1k vocab, as an HF config.json."""
    from gsjax.models.qwen3_vl.config import preset

    hf = preset("tiny").to_hf_dict()
    hf["text_config"].update(num_hidden_layers=1, vocab_size=1024)
    hf["vision_config"].update(depth=1, deepstack_visual_indexes=[0])
    hf.update(image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003)
    path.write_text(json.dumps(hf))
    return path


@NEEDS_8
def test_bench_layouts_tiny_two_layouts(app, tmp_path):
    out = tmp_path / "layouts.json"
    config = small_tiny_config(tmp_path / "config.json")
    result = CliRunner().invoke(app, ["bench", "layouts", "--model", str(config), "--layout", "fsdp=8",
                                      "--layout", "fsdp=4,tensor=2", "--seq", "32", "--batch", "8",
                                      "--steps", "2", "--warmup", "1", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["devices"] == 8 and report["backend"] == "cpu" and report["steps"] == 2
    rows = report["results"]
    assert [r["layout"] for r in rows] == ["fsdp=8", "fsdp=4,tensor=2"]
    for row in rows:
        assert set(row) == RESULT_FIELDS
        assert len(row["step_times_s"]) == 2 and row["step_time_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(8 * 32 / row["step_time_s"])
        assert row["xla_peak_bytes"] > 0 and row["estimate_bytes"] > 0
        assert row["loss"] > 0
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-3)  # same start, same data, same steps
    assert rows[1]["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    # the same JSON goes to stdout (the table goes to stderr)
    assert json.loads(result.stdout[result.stdout.index("{"):]) == report


def test_estimate_json(app):
    result = CliRunner().invoke(app, ["estimate", "--model", "8b", "--mesh", "fsdp=8", "--seq", "8192",
                                      "--batch", "8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["total"] == data["state"] + data["grads"] + data["activations"]["total"]
    assert data["tokens_per_device"] == 8192 and data["attention_kernel"] == "cudnn"


def test_estimate_table_and_hf_config(app, tmp_path):
    from gsjax.models.qwen3_vl.config import preset

    path = tmp_path / "config.json"
    path.write_text(json.dumps(preset("2b").to_hf_dict()))
    result = CliRunner().invoke(app, ["estimate", "--model", str(path), "--mesh", "fsdp=4,tensor=2",
                                      "--seq", "4096", "--batch", "4", "--remat", "none"])
    assert result.exit_code == 0, result.output
    assert "total" in result.stdout and "GiB" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--mesh", "fsdp=3"], "embed_tokens: dimension 1 (embed) of size 4096 does not divide mesh axes ('fsdp',)"),
    (["--mesh", "rows=8"], "mesh item 'rows=8' is not AXIS=SIZE"),
    (["--model", "nope"], "'nope' is neither a preset (2b, 4b, 8b, 30b-a3b, tiny, tiny-moe) nor a config.json"),
    (["--backend", "npu"], "backend 'npu' not one of gpu, tpu, cpu"),
    (["--batch", "3"], "dimension 0 (act_batch) of size 3 does not divide mesh axes ('fsdp',) of size 8")])
def test_estimate_rejects_bad_input(app, args, message):
    result = CliRunner().invoke(app, ["estimate", "--model", "8b", "--mesh", "fsdp=8", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split())  # the message, unwrapped from its box
