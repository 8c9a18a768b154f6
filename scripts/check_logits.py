#!/usr/bin/env python
"""Compare gsjax's logits with transformers' on any Qwen3-VL / Qwen3-VL-MoE checkpoint directory.

Builds a batch of two rows (one with an image of random pixels, one text-only and left-padded), runs
`gsjax logits` in a subprocess (so JAX and torch never hold the model at once) and transformers (fp32,
eager) in this process, and prints one JSON line. Exits 1 when max |Δlogit| exceeds --tol.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from gsjax.models.qwen3_vl import reference as R
from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.models.qwen3_vl.model import prepare_inputs

FIRST_SPECIAL_ID = 151643


def build_inputs(config: Qwen3VLConfig, seed: int, text_len: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id,
               config.vision_end_token_id}
    pool = np.setdiff1d(np.arange(min(config.text.vocab_size, FIRST_SPECIAL_ID)), list(special))
    grids = [(1, 4, 6)]
    text = tuple(int(t) for t in rng.choice(pool, size=text_len))
    row0 = R.image_prompt(grids, config.image_token_id, config.vision_start_token_id,
                          config.vision_end_token_id, config.vision.spatial_merge_size, text)
    pad = 3
    row1 = np.concatenate([np.zeros(pad, np.int64), rng.choice(pool, size=row0.size - pad)])
    mask = np.ones((2, row0.size), np.int64)
    mask[1, :pad] = 0
    return {"input_ids": np.stack([row0, row1]), "attention_mask": mask,
            "pixel_values": R.random_pixels(grids, config.vision.patch_dim, seed),
            "image_grid_thw": np.asarray(grids, np.int64)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf-dir", required=True, type=Path)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="gsjax dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-len", type=int, default=7)
    args = parser.parse_args()
    config = Qwen3VLConfig.from_file(args.hf_dir)
    arrays = build_inputs(config, args.seed, args.text_len)
    with tempfile.TemporaryDirectory() as tmp:
        npz, out = Path(tmp) / "inputs.npz", Path(tmp) / "logits.npy"
        np.savez(npz, **arrays)
        subprocess.run([sys.executable, "-m", "gsjax.cli", "logits", "--hf-dir", str(args.hf_dir),
                        "--inputs", str(npz), "--out", str(out), "--dtype", args.dtype], check=True)
        ours = np.load(out)
    positions = prepare_inputs(config, arrays["input_ids"], arrays["attention_mask"], arrays["pixel_values"],
                               arrays["image_grid_thw"])["positions"]
    ref = R.hf_logits(R.load_hf_model(args.hf_dir), arrays["input_ids"], arrays["attention_mask"], positions,
                      arrays["pixel_values"], arrays["image_grid_thw"])
    valid = arrays["attention_mask"].astype(bool)
    diff = float(np.abs(ours[valid] - ref[valid]).max())
    result = {"hf_dir": str(args.hf_dir), "dtype": args.dtype, "positions": int(valid.sum()),
              "max_abs_diff": diff, "top1_agreement": float(np.mean(ours[valid].argmax(-1) == ref[valid].argmax(-1))),
              "ref_mean_abs_logit": float(np.abs(ref[valid]).mean()), "tol": args.tol, "ok": diff <= args.tol}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
