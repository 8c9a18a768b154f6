"""Command bodies for `gsjax logits` and the current `gsjax demo` (file I/O and printing live here)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .checkpoint import export_hf, load_hf
from .config import RuntimeConfig

REQUIRED_KEYS = ("input_ids", "attention_mask")
OPTIONAL_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


def read_inputs(path: Path) -> dict[str, np.ndarray]:
    """Arrays from an npz, with a clear error for a missing key or an image half given."""
    if not path.exists():
        raise FileNotFoundError(f"inputs file {path} does not exist")
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


def tiny_model_demo(workdir: Path) -> dict:
    """The main job until `gsjax demo` grows SFT and GRPO: a tiny random Qwen3-VL end to end on CPU."""
    from flax import nnx
    from rich.console import Console

    from gsjax.processor import ImageProcessorConfig, encode_chat, load_tokenizer

    from .config import preset
    from .forward import Runner
    from .model import Qwen3VL

    console = Console()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config = preset("tiny")
    console.print(f"[bold]1.[/] building a tiny random Qwen3-VL ({config.text.num_hidden_layers} layers, "
                  f"hidden {config.text.hidden_size}, ViT depth {config.vision.depth})")
    model = Qwen3VL(config, rngs=nnx.Rngs(0))
    hf_dir = export_hf(model, workdir / "tiny-qwen3vl-hf")
    console.print(f"[bold]2.[/] exported an HF checkpoint to {hf_dir}; reloading it tensor by tensor")
    model = load_hf(hf_dir)
    tokenizer = load_tokenizer()
    image_path = workdir / "demo.png"
    _demo_image().save(image_path)
    pcfg = ImageProcessorConfig(patch_size=config.vision.patch_size, min_pixels=64 * 64, max_pixels=128 * 128)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image_path)},
                                             {"type": "text", "text": "Who painted this? Search if unsure."}]}]
    enc = encode_chat(messages, tokenizer, pcfg, add_generation_prompt=True)
    console.print(f"[bold]3.[/] encoded a chat with one image: {enc.input_ids.size} tokens, "
                  f"image grid {enc.image_grid_thw.tolist()}")
    arrays = {"input_ids": enc.input_ids[None], "pixel_values": enc.pixel_values,
              "image_grid_thw": enc.image_grid_thw}
    new_ids = Runner(model).greedy(arrays, max_new_tokens=12, stop_ids=(tokenizer.eos_token_id,))
    text = tokenizer.decode(new_ids[0])
    console.print(f"[bold]4.[/] greedy reply of the (untrained) model: {text!r}")
    summary = {"prompt_tokens": int(enc.input_ids.size), "generated_tokens": int(new_ids.shape[1]),
               "reply": text, "hf_dir": str(hf_dir), "seconds": round(time.perf_counter() - t0, 2)}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    console.print(f"done in {summary['seconds']} s; summary in {workdir / 'summary.json'}")
    return summary


def _demo_image():
    from PIL import Image

    yy, xx = np.mgrid[0:96, 0:128]
    rgb = np.stack([(xx * 2) % 256, (yy * 3) % 256, ((xx + yy) * 5) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)
