"""`keep_freed_memory`: after it, glibc serves large blocks from the heap (no mapping per block) and keeps
them after `free`, which is what lets XLA's next CPU step reuse the last one's pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gsjax.malloc import OPT_OUT_ENV

PROBE = """
import ctypes, json, sys
from gsjax.malloc import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory()
before = libc.mallinfo2()
block = libc.malloc(96 << 20)  # larger than glibc's largest mmap threshold (32 MiB)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "new_mappings": during.hblks - before.hblks,
                  "heap_kept": after.arena - before.arena}))
"""


def probe(**env: str) -> dict:
    """The probe in a child process whose environment sets only `env` of the opt-out (whatever the CI's)."""
    base = {k: v for k, v in os.environ.items() if k != OPT_OUT_ENV}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_come_from_the_heap_and_stay_after_free() -> None:
    tuned = probe()
    assert tuned["applied"] == ["M_MMAP_MAX", "M_TRIM_THRESHOLD", "M_ARENA_MAX"]
    assert tuned["new_mappings"] == 0
    assert tuned["heap_kept"] >= 96 << 20  # kept for the next step

    system = probe(**{OPT_OUT_ENV: "system"})
    assert system["applied"] == []
    assert system["new_mappings"] == 1  # glibc's default: its own mapping, unmapped on free
    assert system["heap_kept"] < 96 << 20
