"""The image-generator server as a child process of the demo, with a lifecycle that cannot leak it.

The server runs `gsjax serve-image` over a tiny random diffusers pipeline, in its own session (a Ctrl-C
in the terminal reaches only the demo, which then stops the server itself: SIGTERM to the whole process
group, SIGKILL after a grace period). `ImageServer` is a context manager, so the stop happens on any
exit: normal, exception or KeyboardInterrupt.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

from gsjax.imagegen.tiny import TINY_CALL_DEFAULTS, TINY_REFERENCE_VAE_AREA


class ServerStartError(RuntimeError):
    """The server exited or did not report healthy in time; the message carries the tail of its log."""


def ensure_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """The tiny random edit pipeline at `folder`, built once (into a temp folder, then renamed)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from gsjax.imagegen.tiny import build_tiny_pipeline

    for lib in (diffusers_logging, transformers_logging):  # no shard progress bars or save notes in the demo
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_pipeline(tmp, kind="edit-plus", seed=seed)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ImageServer:
    """`gsjax serve-image` on a free local port; `url` once `start()` returned."""

    def __init__(self, pipeline_path: Path, log_path: Path, *, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout_s: float = 180.0, stop_grace_s: float = 10.0, threads: int = 1):
        self.pipeline_path, self.log_path = Path(pipeline_path), Path(log_path)
        self.pid_path = self.log_path.with_suffix(".pid")  # present exactly while the server may be running
        self.host, self.port = host, port
        self.startup_timeout_s, self.stop_grace_s, self.threads = startup_timeout_s, stop_grace_s, threads
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gsjax.cli", "serve-image", "--pipeline-path", str(self.pipeline_path),
                "--host", self.host, "--port", str(self.port), "--device", "cpu", "--dtype", "float32",
                "--height", str(TINY_CALL_DEFAULTS["height"]), "--width", str(TINY_CALL_DEFAULTS["width"]),
                "--reference-vae-area", str(TINY_REFERENCE_VAE_AREA), "--log-level", "warning"]

    def launch(self) -> None:
        """Start the process without waiting for it (so model loading overlaps other work)."""
        if self.process is not None:
            raise RuntimeError("the image server was already started")
        self.port = self.port or free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.pid_path.write_text(f"{self.process.pid}\n")

    def wait_healthy(self) -> None:
        """Block until `GET /health` says healthy; raise (with the log tail) if the process dies or stalls."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + self.startup_timeout_s
        reason = "no reply"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(f"image server exited with code {code} during start-up; log "
                                       f"{self.log_path}:\n{_tail(self.log_path)}")
            try:
                reply = httpx.get(self.url + "/health", timeout=2.0).json()
                if reply.get("status") == "healthy":
                    return
                reason = str(reply.get("reason"))
            except (httpx.HTTPError, ValueError) as exc:
                reason = f"{type(exc).__name__}"
            time.sleep(0.5)
        raise ServerStartError(f"image server not healthy after {self.startup_timeout_s:g} s ({reason}); log "
                               f"{self.log_path}:\n{_tail(self.log_path)}")

    def start(self) -> Self:
        if self.process is None:
            self.launch()
        self.wait_healthy()
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after the grace period; idempotent."""
        proc, self.process = self.process, None
        code = None
        if proc is not None:
            code = _terminate_group(proc, self.stop_grace_s)
            self.pid_path.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the server leads its own session, so its group id is its pid
    except (ProcessLookupError, PermissionError):
        pass


def _terminate_group(proc: subprocess.Popen, grace_s: float) -> int | None:
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:  # a second Ctrl-C while waiting: stop at once
            pass
        _signal_group(proc.pid, signal.SIGKILL)
    return proc.wait()
