"""Ctrl-C handling: an interrupt swallowed by library code is delivered again, and none lands in cleanup."""

from __future__ import annotations

import os
import signal
import time

import pytest

from gsjax.demo.interrupts import Interrupts, interruptible


def test_a_swallowed_interrupt_is_delivered_again_until_cleanup() -> None:
    seen: list[Interrupts] = []
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under a shell's `cmd &`
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with interruptible() as interrupts:
            seen.append(interrupts)
            interrupts.redeliver_s = 0.1
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass  # what JAX's gc callback does with it
            time.sleep(5)  # the watchdog must end this
    assert time.monotonic() - start < 4
    assert seen[0].requested == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_signals_during_cleanup_are_ignored_and_interrupt_chains_are_recognised() -> None:
    interrupts = Interrupts()
    interrupts.cleanup()
    assert interrupts.handler(signal.SIGINT, None) is None and interrupts.requested is None
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise ValueError("wrapped by a library") from exc
    except ValueError as wrapped:
        assert interrupts.explains(wrapped)
    assert not interrupts.explains(RuntimeError("unrelated"))
