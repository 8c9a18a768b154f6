"""Command bodies for `gsjax logits` and the current `gsjax demo` (file I/O and printing live here)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gsjax.errors import InputFileNotFound

from .checkpoint import load_hf
from .config import RuntimeConfig

REQUIRED_KEYS = ("input_ids", "attention_mask")
OPTIONAL_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


def read_inputs(path: Path) -> dict[str, np.ndarray]:
    """Arrays from an npz, with a clear error for a missing key or an image half given."""
    if not path.exists():
        raise InputFileNotFound(f"inputs file {path} does not exist")
    with np.load(path) as npz:
        missing = [k for k in REQUIRED_KEYS if k not in npz]
        if missing:
            raise KeyError(f"{path}: missing array(s) {missing}; found {sorted(npz.files)}")
        arrays = {k: npz[k] for k in (*REQUIRED_KEYS, *OPTIONAL_KEYS) if k in npz}
    if ("pixel_values" in arrays) != ("image_grid_thw" in arrays):
        raise KeyError(f"{path}: pixel_values and image_grid_thw must be given together")
    return arrays


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def write_logits(hf_dir: Path, inputs: Path, out: Path, dtype: str = "float32") -> np.ndarray:
    import jax

    from .forward import Runner

    if dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")  # no TF32/bf16 passes on GPU/TPU
    model = load_hf(hf_dir, runtime=RuntimeConfig(param_dtype=dtype, dtype=dtype))
    logits = Runner(model).logits(read_inputs(inputs))
    save_npy_atomic(out, logits)
    return logits
