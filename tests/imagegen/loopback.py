"""A real uvicorn server on 127.0.0.1 with an OS-chosen free port, in a background thread, for any ASGI
app (the image server, or a fake of another API)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Self

import uvicorn


class LoopbackUvicorn:
    """`with LoopbackUvicorn(app) as server:` serves `app` at `server.url` until the block ends."""

    def __init__(self, app: Any, startup_timeout_s: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._startup_timeout_s = startup_timeout_s

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("uvicorn exited during startup (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start within {self._startup_timeout_s} s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()
