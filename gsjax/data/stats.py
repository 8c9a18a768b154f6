"""Padding waste of a batch plan, and a report for an SFT file: `python -m gsjax.data.stats PATH`.

Waste is the share of padded slots that hold no real token (or no real vision row), over one epoch, counting
the empty rows of a bucket's last partial batch. The report compares the configured buckets with padding every
row to the cutoff (one shape) and with padding each randomly drawn batch to its own longest row (no buckets,
as many shapes as there are distinct lengths), so the cost of few shapes is visible.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gsjax.data.buckets import BatchPlan, padding_waste, unbucketed_waste
from gsjax.data.config import DEFAULT_BUCKETS, SFTDataConfig
from gsjax.data.encode import EncodeContext
from gsjax.data.index import RecordIndex, build_index
from gsjax.data.loader import image_config_for
from gsjax.data.records import RecordFile
from gsjax.data.synthetic import SyntheticSpec, write_synthetic_sft


def report(index: RecordIndex, cfg: SFTDataConfig, process_count: int = 1,
           alternatives: tuple[tuple[int, ...], ...] = ()) -> dict[str, Any]:
    """Length statistics and waste for the configured buckets, other bucket lists, and the two baselines."""
    lengths = index.lengths[index.lengths >= 0]

    def plan(buckets: tuple[int, ...]) -> BatchPlan:
        return BatchPlan(lengths=index.lengths, vision_rows=index.vision_rows, buckets=buckets,
                         batch_size=cfg.batch_size, process_count=process_count, num_epochs=1, seed=cfg.seed,
                         shuffle=cfg.shuffle, drop_remainder=cfg.drop_remainder,
                         vision_row_buckets=cfg.vision_row_buckets, min_vision_rows=cfg.min_vision_rows)

    return {
        "records": int(index.lengths.size), "valid": index.num_valid, "skipped": index.skips.as_dict(),
        "length": {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max()),
                   "mean": float(lengths.mean())},
        "global_batch": cfg.batch_size * process_count,
        "buckets": [{"buckets": list(b), **padding_waste(plan(b))} for b in (cfg.length_buckets, *alternatives)],
        "pad_to_cutoff": padding_waste(plan((cfg.cutoff_len,))),
        "unbucketed": unbucketed_waste(index.lengths, cfg.batch_size * process_count, cfg.seed),
    }


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gsjax.data.stats", description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", help="SFT data file (JSON array or JSONL); omit with --synthetic")
    p.add_argument("--synthetic", type=int, default=0, help="measure N synthetic records instead of PATH")
    p.add_argument("--image-root", default=None)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (rows per step over all hosts)")
    p.add_argument("--buckets", action="append", help="comma-separated lengths; repeat to compare lists "
                   f"(default {','.join(map(str, DEFAULT_BUCKETS))})")
    p.add_argument("--words", default="4,40", help="synthetic words per turn, LO,HI")
    p.add_argument("--rounds", type=int, default=3, help="synthetic tool rounds at most")
    p.add_argument("--cutoff", type=int, default=32768)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--model", default="8b", help="model preset for the image patch geometry")
    p.add_argument("--model-dir", default=None, help="checkpoint directory for its tokenizer")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from gsjax.models.qwen3_vl.config import preset
    from gsjax.processing.tokenizer import load_tokenizer

    args = _parse_args(argv)
    if not args.path and not args.synthetic:
        raise SystemExit("give PATH or --synthetic N")
    spec = SyntheticSpec(words=_ints(args.words), max_tool_rounds=args.rounds)
    path = args.path or str(write_synthetic_sft(tempfile.mkdtemp(prefix="gsjax-sft-"), args.synthetic, spec=spec))
    bucket_lists = [_ints(b) for b in args.buckets or [",".join(map(str, DEFAULT_BUCKETS))]]
    cfg = SFTDataConfig(path=path, image_root=args.image_root, batch_size=args.batch_size,
                        buckets=bucket_lists[0], cutoff_len=args.cutoff, worker_count=args.workers)
    ctx = EncodeContext.from_config(cfg, load_tokenizer(args.model_dir), image_config_for(preset(args.model), None))
    index = build_index(RecordFile(cfg.path), ctx, worker_count=cfg.index_workers)
    others = tuple(replace(cfg, buckets=b).length_buckets for b in bucket_lists[1:])
    out = {"path": str(Path(path)), **report(index, replace(cfg, num_epochs=1), alternatives=others)}
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return out


if __name__ == "__main__":
    main()
