"""JAX's persistent compilation cache, switched on by `train.compile_cache_dir`.

A resumed or repeated run then loads the executables it compiled before instead of compiling them again (on
the demo's 2-core CPU compiling is a large part of a short run; on a pod it is minutes per restart). Entries are
keyed by the program, the compile options and the jax/XLA version, so a stale entry is never used. The folder
is trusted: whoever can write to it can run code in the training process (jax's warning).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger(__name__)


def use_compile_cache(directory: str | Path | None, min_compile_seconds: float = 0.5) -> Path | None:
    """Persist executables that took at least `min_compile_seconds` to compile under `directory` (None: leave
    jax's setting alone). Returns the folder in use."""
    if not directory:
        return None
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(path):
        compilation_cache.set_cache_dir(str(path))
        compilation_cache.reset_cache()  # the process may have decided "no cache" at an earlier compile
        log.info("compilation cache: %s", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return path
