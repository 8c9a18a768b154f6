"""Metrics: JSONL that stays consistent across kills and resumes, optional TensorBoard, the live
display, and throughput / MFU from FLOPs per token."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from gsjax.models.qwen3_vl.config import preset
from gsjax.models.qwen3_vl.flops import train_flops_per_token
from gsjax.train import metrics as M


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in M.read_metrics(path)]


def test_jsonl_records_one_line_per_step(tmp_path: Path):
    path = tmp_path / "run" / "metrics.jsonl"
    writer = M.JsonlWriter(path)
    writer.write(1, {"loss": np.float32(2.5), "lr": 1e-5, "tokens": np.int64(12), "note": "warmup"})
    writer.write(2, {"loss": 2.25})
    writer.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert (first["step"], first["loss"], first["lr"], first["tokens"], first["note"]) == (1, 2.5, 1e-5, 12, "warmup")
    assert isinstance(first["time"], float)
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(3, {})


def test_resume_drops_steps_past_the_restored_one(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    writer = M.JsonlWriter(path)
    for step in range(1, 11):
        writer.write(step, {"loss": float(step)})
    writer.close()  # the run was killed after step 10; the last checkpoint is step 6
    writer = M.JsonlWriter(path, resume_step=6)
    assert _steps(path) == [1, 2, 3, 4, 5, 6]
    writer.write(7, {"loss": 0.5})
    writer.close()
    assert _steps(path) == [1, 2, 3, 4, 5, 6, 7]
    M.JsonlWriter(path, resume_step=None).close()  # a fresh run starts a fresh record
    assert _steps(path) == []


def test_a_torn_last_line_is_skipped_and_then_removed(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    writer = M.JsonlWriter(path)
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 0.9})
    writer.close()
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 0.8')  # killed mid-write: no closing brace, no newline
    assert _steps(path) == [1, 2]
    writer = M.JsonlWriter(path, resume_step=2)
    writer.write(3, {"loss": 0.7})
    writer.close()
    assert _steps(path) == [1, 2, 3]
    assert all(json.loads(line) for line in path.read_text().splitlines())  # every line parses now


def test_step_timer_gives_tokens_per_second_and_mfu():
    config = preset("tiny")
    now = [100.0]
    timer = M.StepTimer(model_config=config, peak_flops=1e12, clock=lambda: now[0])
    with pytest.raises(RuntimeError, match="before start"):
        timer.lap(10, 32)
    timer.start()
    now[0] += 2.0
    first = timer.lap(tokens=4096, seq_len=512)
    assert first.seconds == 2.0 and first.tokens_per_second == 2048.0
    assert first.mfu == pytest.approx(2048.0 * train_flops_per_token(config, 512) / 1e12)
    now[0] += 0.5
    second = timer.lap(tokens=1024, seq_len=256)
    assert second.seconds == 0.5 and second.tokens_per_second == 2048.0
    assert second.mfu < first.mfu  # shorter sequences: less attention work per token


def test_throughput_without_a_peak_has_no_mfu():
    result = M.throughput(tokens=300, seconds=1.5)
    assert result.tokens_per_second == 200.0 and result.mfu is None
    assert M.throughput(tokens=10, seconds=0.0).tokens_per_second == 0.0


def test_tensorboard_is_skipped_silently_when_missing(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(M, "_summary_writer_class", lambda: None)
    assert M.TensorBoardWriter.open(tmp_path) is None
    with M.MetricsLogger(tmp_path, total_steps=3, progress=False) as logger:
        logger.log(1, {"loss": 1.0})
    assert _steps(tmp_path / "metrics.jsonl") == [1]
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_gets_the_numeric_metrics(tmp_path: Path, monkeypatch):
    calls: list[tuple] = []

    class FakeWriter:
        def __init__(self, logdir: str):
            calls.append(("open", logdir))

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            calls.append((tag, value, step))

        def flush(self) -> None:
            calls.append(("flush",))

        def close(self) -> None:
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeWriter))
    with M.MetricsLogger(tmp_path, total_steps=3, progress=False) as logger:
        logger.log(4, {"loss": np.float32(0.5), "tokens": 7, "note": "text is not a scalar"})
    assert calls == [("open", str(tmp_path / "tensorboard")), ("loss", 0.5, 4), ("tokens", 7.0, 4), ("flush",),
                     ("close",)]


def test_progress_display_shows_the_training_numbers(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(M, "_summary_writer_class", lambda: None)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with M.MetricsLogger(tmp_path, total_steps=10, resume_step=None, console=console) as logger:
        logger.log(3, {"loss": 1.23456, "lr": 2e-5, "grad_norm": 0.5, "tokens_per_second": 12345.6, "mfu": 0.4125})
    text = out.getvalue()
    for piece in ("3/10", "loss 1.2346", "lr 2.00e-05", "gnorm 0.500", "tok/s 12,346", "mfu 41.2%"):
        assert piece in text, (piece, text)


def test_format_stats_leaves_out_what_is_missing():
    assert M.format_stats({"loss": 2.0}) == "loss 2.0000"
    assert M.format_stats({"mfu": None, "grad_norm": np.float32(1.5)}) == "gnorm 1.500"


def test_a_disabled_logger_writes_nothing(tmp_path: Path):
    with M.MetricsLogger(tmp_path / "off", total_steps=3, enabled=False) as logger:
        logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "off").exists()
