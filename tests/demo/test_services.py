"""The image server child process: it starts, answers, and is gone after every kind of exit; a server that
ignores SIGTERM is killed; one that dies during start-up is reported with its log."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from gsjax.demo.services import ImageServer, ServerStartError, ensure_tiny_pipeline

from .processes import alive


@pytest.fixture
def pipeline(tiny_pipeline: Path) -> Path:
    return tiny_pipeline


def test_tiny_pipeline_is_built_once(pipeline: Path) -> None:
    stamp = (pipeline / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_pipeline(pipeline) == pipeline
    assert (pipeline / "model_index.json").stat().st_mtime_ns == stamp


def test_server_answers_then_stops_even_when_the_body_raises(pipeline: Path, tmp_path: Path) -> None:
    server = ImageServer(pipeline, tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="boom"):
        with server:
            pid = server.process.pid
            assert httpx.get(server.url + "/health").json()["status"] == "healthy"
            raise RuntimeError("boom")
    assert server.process is None and not alive(pid)
    assert server.stop() is None  # idempotent


class _Stubborn(ImageServer):
    """A process that ignores SIGTERM and never serves: the stop must escalate to SIGKILL."""

    pids: list[int] = []

    def launch(self) -> None:
        super().launch()
        self.pids.append(self.process.pid)

    def command(self) -> list[str]:
        code = textwrap.dedent("""
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("ready", flush=True)
            time.sleep(600)
        """)
        return [sys.executable, "-c", code]


def test_stop_escalates_to_sigkill_and_startup_timeouts_clean_up(tmp_path: Path) -> None:
    server = _Stubborn(tmp_path, tmp_path / "stubborn.log", startup_timeout_s=1.0, stop_grace_s=0.5)
    with pytest.raises(ServerStartError, match="not healthy after 1 s"):
        with server:
            pass
    assert server.process is None
    assert len(server.pids) == 1 and not alive(server.pids[0])


def test_a_server_that_dies_at_startup_is_reported_with_its_log(tmp_path: Path) -> None:
    server = ImageServer(tmp_path / "no_such_pipeline", tmp_path / "dead.log", startup_timeout_s=60.0)
    with pytest.raises(ServerStartError, match="exited with code") as err:
        server.start()
    assert "no_such_pipeline" in str(err.value) or "model_index" in str(err.value)
    server.stop()
    assert server.process is None
