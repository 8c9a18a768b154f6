"""The XLA flags a test gives the JAX processes it starts: this run's compile settings (tests/conftest.py)
with the device count that process should see."""

from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None) -> str:
    """This run's XLA_FLAGS with `devices` host CPU devices, or XLA's default of one when None."""
    kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if not flag.startswith(DEVICE_COUNT_FLAG)]
    if devices is not None:
        kept.append(f"{DEVICE_COUNT_FLAG}={devices}")
    return " ".join(kept)
