"""Training metrics: a JSONL file (the record of the run), optional TensorBoard, a live rich display, and
throughput / MFU from FLOPs per token.

The JSONL file is the source of truth: one object per logged step, each written with a single append so
a kill leaves at worst one torn last line, which readers skip. On resume the file is rewritten without
the lines past the restored step (and without any torn line), so the steps in it never repeat.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.models.qwen3_vl.flops import mfu, train_flops_per_token

Metrics = Mapping[str, Any]


# ---------------------------------------------------------------------- throughput
@dataclass(frozen=True)
class Throughput:
    seconds: float
    tokens: float
    tokens_per_second: float
    mfu: float | None  # fraction of peak; None when the peak is unknown


def throughput(tokens: float, seconds: float, flops_per_token: float | None = None,
               peak_flops: float | None = None) -> Throughput:
    """Tokens/s over an interval and, given FLOPs per token and the peak FLOP/s of all devices, MFU."""
    rate = tokens / seconds if seconds > 0 else 0.0
    util = mfu(rate, flops_per_token, peak_flops) if flops_per_token and peak_flops else None
    return Throughput(seconds, tokens, rate, util)


@dataclass
class StepTimer:
    """Wall time between `lap`s turned into tokens/s and MFU.

    `tokens` are all tokens the step processed (padding excluded, prompt included), not the loss
    denominator: MFU counts the work done. FLOPs per token depend on the sequence length (attention),
    so they are computed per lap from `seq_len` and cached."""

    model_config: Qwen3VLConfig | None = None
    peak_flops: float | None = None  # per device × number of devices
    clock: Callable[[], float] = time.perf_counter
    _last: float | None = field(default=None, init=False)
    _flops: dict[int, float] = field(default_factory=dict, init=False)

    def start(self) -> None:
        self._last = self.clock()

    def flops_per_token(self, seq_len: int) -> float | None:
        if self.model_config is None:
            return None
        if seq_len not in self._flops:
            self._flops[seq_len] = train_flops_per_token(self.model_config, seq_len)
        return self._flops[seq_len]

    def lap(self, tokens: float, seq_len: int) -> Throughput:
        """Throughput since `start` or the previous lap; call after the step's results are ready."""
        now = self.clock()
        if self._last is None:
            raise RuntimeError("StepTimer.lap() before start()")
        seconds, self._last = now - self._last, now
        return throughput(tokens, seconds, self.flops_per_token(seq_len), self.peak_flops)


# ---------------------------------------------------------------------- JSONL
def _jsonable(value: Any) -> Any:
    """numpy / jax scalars and 0-d arrays as Python numbers; anything else as its string."""
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _parse_lines(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a killed writer
        if isinstance(record, dict):
            yield record


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of a metrics file; torn or blank lines are skipped."""
    path = Path(path)
    return list(_parse_lines(path.read_text(errors="replace"))) if path.exists() else []


def _steps_upto(records: list[dict[str, Any]], last_step: int | None) -> list[dict[str, Any]]:
    if last_step is None:
        return []
    return [r for r in records if isinstance(r.get("step"), (int, float)) and r["step"] <= last_step]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlWriter:
    """Append-only JSONL metrics. `resume_step`: keep the records up to that step (a resumed run);
    None: a fresh run, earlier records are dropped."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = _steps_upto(read_metrics(self.path), resume_step)
        _atomic_write(self.path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in kept))
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._fsync = fsync

    def write(self, step: int, metrics: Metrics) -> None:
        if self._fd is None:
            raise RuntimeError(f"metrics file {self.path} is closed")
        record = {"step": int(step), "time": round(time.time(), 3), **metrics}
        data = (json.dumps(record, default=_jsonable) + "\n").encode()
        while data:  # one write() per record in practice; loop only on a short write
            data = data[os.write(self._fd, data):]
        if self._fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------- TensorBoard
def _summary_writer_class() -> type | None:
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter
    except ImportError:
        return None


class TensorBoardWriter:
    """Scalars to TensorBoard through tensorboardX or torch's writer."""

    def __init__(self, writer: Any):
        self._writer = writer

    @classmethod
    def open(cls, logdir: str | os.PathLike) -> TensorBoardWriter | None:
        """A writer, or None (silently) when neither tensorboardX nor torch's tensorboard is installed."""
        writer_cls = _summary_writer_class()
        return None if writer_cls is None else cls(writer_cls(str(logdir)))

    def write(self, step: int, metrics: Metrics) -> None:
        for key, value in metrics.items():
            number = _as_number(value)
            if number is not None:
                self._writer.add_scalar(key, number, int(step))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item") and getattr(value, "size", 0) == 1:
        item = value.item()
        return float(item) if isinstance(item, (int, float)) else None
    return None


# ---------------------------------------------------------------------- live display
def format_stats(metrics: Metrics) -> str:
    """The one-line summary shown next to the progress bar."""
    parts = []
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("lr", "lr", "{:.2e}"), ("grad_norm", "gnorm", "{:.3f}"),
                            ("tokens_per_second", "tok/s", "{:,.0f}")):
        number = _as_number(metrics.get(key))
        if number is not None:
            parts.append(f"{label} {fmt.format(number)}")
    util = _as_number(metrics.get("mfu"))
    if util is not None and math.isfinite(util):
        parts.append(f"mfu {100 * util:.1f}%")
    return "  ".join(parts)


class ProgressDisplay:
    """A rich progress bar with step, loss, lr, grad norm, tokens/s and MFU."""

    def __init__(self, total_steps: int, start_step: int = 0, console: Console | None = None):
        self._progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=console)
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")
        self._progress.start()

    def write(self, step: int, metrics: Metrics) -> None:
        self._progress.update(self._task, completed=step, stats=format_stats(metrics))

    def close(self) -> None:
        self._progress.stop()


# ---------------------------------------------------------------------- all together
class MetricsLogger:
    """Fan-out of each logged step to JSONL, TensorBoard (when importable) and the live display.

    Only the primary process should pass `enabled=True` in a multi-host run."""

    def __init__(self, out_dir: str | os.PathLike, total_steps: int, resume_step: int | None = None, *,
                 tensorboard: bool = True, progress: bool = True, enabled: bool = True,
                 console: Console | None = None):
        self._sinks: list[Any] = []
        self.jsonl: JsonlWriter | None = None
        if not enabled:
            return
        out = Path(out_dir)
        self.jsonl = JsonlWriter(out / "metrics.jsonl", resume_step)
        self._sinks.append(self.jsonl)
        if tensorboard and (tb := TensorBoardWriter.open(out / "tensorboard")) is not None:
            self._sinks.append(tb)
        if progress:
            self._sinks.append(ProgressDisplay(total_steps, resume_step or 0, console))

    def log(self, step: int, metrics: Metrics) -> None:
        for sink in self._sinks:
            sink.write(step, metrics)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

