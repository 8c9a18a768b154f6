"""`gsjax demo` end to end: a tiny run finishes with a report, a second run detects the finished stages, and
an interrupt at any point leaves no image server behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gsjax.demo.context import DemoConfig, DemoContext, Layout
from gsjax.demo.pipeline import _start_over, run_demo

from ..subprocess_env import xla_flags
from .processes import alive


def test_ctrl_c_after_the_server_started_stops_it(workdir: Path) -> None:
    seen: dict[str, int] = {}

    def hook(event: str, ctx: DemoContext) -> None:
        if event == "server_launched":
            assert ctx.server is not None and ctx.server.process is not None
            seen["pid"] = ctx.server.process.pid
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoConfig(workdir=workdir, sft_steps=1, grpo_steps=1), hook=hook)
    assert not alive(seen["pid"])
    assert not (workdir / "logs" / "image_server.pid").exists()
    state = json.loads((workdir / "demo_state.json").read_text())["stages"]
    assert set(state) == {"trajectories"}  # finished stages are kept for the next run


def _command(workdir: Path) -> tuple[list[str], dict[str, str]]:
    # one CPU device, as `gsjax demo` runs, with this test run's compile flags
    env = {**os.environ, "XLA_FLAGS": xla_flags(None)}
    env["COLUMNS"] = "200"
    return [sys.executable, "-m", "gsjax.demo.cli", "--workdir", str(workdir), "--sft-steps", "2", "--grpo-steps",
            "1", "--prompts-per-step", "1", "--group-size", "2", "--max-llm-calls", "2", "--max-new-tokens",
            "16"], env


def _demo(workdir: Path) -> subprocess.CompletedProcess:
    command, env = _command(workdir)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def test_sigint_to_the_demo_process_stops_the_server_and_exits_130(workdir: Path) -> None:
    """A real Ctrl-C: the terminal signals the demo's process group; the server runs in its own session."""
    command, env = _command(workdir)
    pid_file = workdir / "logs" / "image_server.pid"
    demo = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not pid_file.is_file() and demo.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pid_file.is_file(), "the demo never launched the image server"
        server_pid = int(pid_file.read_text())
        demo.send_signal(signal.SIGINT)
        out, _ = demo.communicate(timeout=300)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, out[-3000:]
    assert "interrupted" in out and "resume" in out
    assert not alive(server_pid) and not pid_file.exists()


@pytest.mark.slow
def test_demo_runs_end_to_end_then_a_second_run_skips_finished_stages(workdir: Path) -> None:
    tmp_path = workdir
    first = _demo(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state = json.loads((tmp_path / "demo_state.json").read_text())["stages"]
    assert state["sft"]["steps"] == 2 and state["grpo"]["steps"] == 1
    assert (tmp_path / "sft" / "hf" / "config.json").is_file()
    assert any((tmp_path / "grpo" / "checkpoints").iterdir())
    assert any(Layout(tmp_path).compile_cache.glob("jit_*"))  # the compiled programs, for a resumed run
    assert not (tmp_path / "logs" / "image_server.pid").exists()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "HEURISTIC" in report and "curves.png" in report and "Example trajectories" in report
    assert (tmp_path / "report" / "curves.png").stat().st_size > 1000
    assert list((tmp_path / "report" / "assets").rglob("*.jpg"))  # the example's search images
    written = (tmp_path / "report" / "report.md").stat().st_mtime_ns
    server_log = (tmp_path / "logs" / "image_server.log").stat().st_size

    second = _demo(tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("skipped (done earlier)") == 3, second.stdout
    assert (tmp_path / "report" / "report.md").stat().st_mtime_ns > written
    assert "skipped (done earlier)" in (tmp_path / "report" / "report.md").read_text()
    # nothing left to train and the example image is cached: the server was not even started
    assert (tmp_path / "logs" / "image_server.log").stat().st_size == server_log


def test_a_second_concurrent_run_in_the_same_folder_is_refused(workdir: Path) -> None:
    def hook(event: str, ctx: DemoContext) -> None:
        if event == "before_trajectories":
            with pytest.raises(RuntimeError, match="another `gsjax demo` is running"):
                run_demo(DemoConfig(workdir=workdir, sft_steps=1, grpo_steps=0))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoConfig(workdir=workdir, sft_steps=1, grpo_steps=0), hook=hook)


def test_starting_over_keeps_only_the_compiled_programs(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "demo")
    for folder in (layout.sft / "checkpoints", layout.compile_cache, layout.data):
        folder.mkdir(parents=True)
    (layout.compile_cache / "jit_step-abc-cache").write_bytes(b"x")
    layout.state.write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the demo's")
    (layout.data / "link").symlink_to(outside)
    (layout.root / "linked").symlink_to(outside)
    _start_over(layout)
    assert sorted(p.name for p in layout.root.iterdir()) == ["xla_cache"]
    assert (layout.compile_cache / "jit_step-abc-cache").read_bytes() == b"x"
    assert (outside / "keep.txt").read_text() == "not the demo's"  # links are removed, never followed
    _start_over(Layout(tmp_path / "never_created"))  # a first run with --fresh
