"""glibc malloc settings for XLA on CPU: freed memory stays in the process for the next step to reuse.

XLA's CPU runtime takes each step's temporaries and outputs from malloc. glibc serves every block above its
mmap threshold (32 MiB at most) with a fresh `mmap` and unmaps it on `free`, so each training step
page-faults its large buffers in again: on the demo's SFT step (tiny model, 2560 tokens, 150k vocab) a third
of the process time was kernel time. Taking all blocks from one heap that is never trimmed makes the next step
reuse the pages of the last one. Measured on that step (60 steps, 2-core CPU): kernel time 34 s -> 9.5 s,
median step 0.76 s -> 0.555 s, peak RSS 3.05 -> 2.92 GB, losses bit-identical.

Called by the command-line entry points before JAX starts its threads; `GSJAX_MALLOC=system` keeps glibc's
defaults. Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS: tuple[tuple[str, int, int], ...] = (
    ("M_MMAP_MAX", M_MMAP_MAX, 0),  # no block gets its own mapping: all come from the heap
    ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, 2**31 - 1),  # freed memory at the heap's top is kept
    ("M_ARENA_MAX", M_ARENA_MAX, 1),  # one heap: threads' arenas would map blocks above 64 MiB anyway
)
OPT_OUT_ENV = "GSJAX_MALLOC"


def keep_freed_memory() -> list[str]:
    """Apply `SETTINGS` through glibc's `mallopt`; returns the names applied (empty when skipped)."""
    if os.environ.get(OPT_OUT_ENV, "").lower() == "system" or not sys.platform.startswith("linux"):
        return []
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return []
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = [name for name, param, value in SETTINGS if mallopt(param, value) == 1]
    if len(applied) < len(SETTINGS):
        log.warning("mallopt refused %s", sorted({name for name, _, _ in SETTINGS} - set(applied)))
    return applied
