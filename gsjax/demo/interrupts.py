"""Ctrl-C and SIGTERM that reliably end the demo.

A KeyboardInterrupt raised by a signal handler can land anywhere in the main thread, including places
that swallow it (a garbage-collection callback of JAX prints "Exception ignored" and carries on) or turn
it into another exception. So the handler remembers the signal and, until the run has reached its
cleanup, sends it again every few seconds from a watchdog thread (a real signal to the main thread, so a
blocking call wakes up too); during cleanup
further signals are ignored so that stopping the image server cannot itself be interrupted.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """The signal handler and its memory; use through `interruptible()`."""

    def __init__(self, redeliver_s: float = 3.0) -> None:
        self.requested: int | None = None
        self.redeliver_s = redeliver_s
        self._cleanup = threading.Event()
        self._watchdog: threading.Thread | None = None

    def handler(self, signum: int, frame: Any) -> None:
        if self._cleanup.is_set():
            return  # already shutting down: let the cleanup finish
        self.requested = signum
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._redeliver, name="demo-interrupt", daemon=True)
            self._watchdog.start()
        raise KeyboardInterrupt(f"signal {signum}")

    def _redeliver(self) -> None:
        main = threading.main_thread().ident
        while not self._cleanup.wait(self.redeliver_s) and main is not None:
            signal.pthread_kill(main, signal.SIGINT)

    def cleanup(self) -> None:
        """From here on signals are ignored and nothing is re-raised (call first thing in `finally`)."""
        self._cleanup.set()
        if self._watchdog is not None:
            self._watchdog.join()

    def explains(self, exc: BaseException) -> bool:
        """True when `exc` is, or was caused by, an interrupt, or an interrupt was requested at all."""
        seen: BaseException | None = exc
        while seen is not None:
            if isinstance(seen, KeyboardInterrupt):
                return True
            seen = seen.__cause__ or seen.__context__
        return self.requested is not None


@contextmanager
def interruptible() -> Iterator[Interrupts]:
    """Install the handler for SIGINT and SIGTERM (main thread only); restore the previous ones on exit."""
    interrupts = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    previous = {sig: signal.signal(sig, interrupts.handler) for sig in SIGNALS}
    try:
        yield interrupts
    finally:
        interrupts.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
