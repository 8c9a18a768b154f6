"""Synthetic ShareGPT SFT data with small PNGs on disk, for tests, the tiny CPU SFT recipe and the demo.

Records follow spec training_and_eval.md §5.1: system prompt, task, then rounds of assistant tool calls and tool
responses (role `observation`, or `user` with an explicit `<tool_response>` wrapper, as the released file may
use either), some carrying `<image>` placeholders, and a final answer, sometimes without think tags (so the
empty-think rule is exercised). Everything is drawn from one seeded generator: same seed, same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

WORDS = ("image", "search", "query", "result", "museum", "painting", "bridge", "river", "city", "photo", "style",
         "colour", "light", "reference", "detail", "object", "scene", "portrait", "landmark", "texture")


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of the synthetic set; word counts per turn are drawn uniformly from `words`."""

    image_fraction: float = 0.5  # share of tool responses that carry images
    max_images_per_turn: int = 2
    max_tool_rounds: int = 3
    words: tuple[int, int] = (4, 40)
    image_side: tuple[int, int] = (16, 640)
    think_free_answer_fraction: float = 0.3


def _text(rng: np.random.Generator, spec: SyntheticSpec) -> str:
    n = int(rng.integers(spec.words[0], spec.words[1] + 1))
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n))


def _tool_turn(rng: np.random.Generator, spec: SyntheticSpec, images: list[str], record: int) -> dict[str, str]:
    k = int(rng.integers(1, spec.max_images_per_turn + 1)) if rng.random() < spec.image_fraction else 0
    for _ in range(k):
        images.append(f"imgs/r{record}_{len(images)}.png")
    body = _text(rng, spec)
    if rng.random() < 0.5:
        return {"role": "observation", "content": "<image>" * k + body}
    return {"role": "user", "content": "<image>" * k + f"<tool_response>\n{body}\n</tool_response>"}


def synthetic_record(rng: np.random.Generator, index: int, spec: SyntheticSpec) -> dict[str, Any]:
    """One multi-turn agent trajectory in ShareGPT form (image paths relative to the data root)."""
    images: list[str] = []
    messages = [{"role": "system", "content": f"You are a search agent. Today is 2025-01-{index % 28 + 1:02d}."},
                {"role": "user", "content": f"Generate an image of {_text(rng, spec)}"}]
    for _ in range(int(rng.integers(0, spec.max_tool_rounds + 1))):
        call = json.dumps({"name": "search", "arguments": {"query": _text(rng, spec)}})
        messages.append({"role": "assistant",
                         "content": f"<think>{_text(rng, spec)}</think>\n<tool_call>\n{call}\n</tool_call>"})
        messages.append(_tool_turn(rng, spec, images, index))
    answer = json.dumps({"prompt": _text(rng, spec), "images": []})
    think = "" if rng.random() < spec.think_free_answer_fraction else f"<think>{_text(rng, spec)}</think>\n"
    messages.append({"role": "assistant", "content": f"{think}<answer>{answer}</answer>"})
    return {"id": f"syn-{index}", "messages": messages, "images": images}


def write_png(path: Path, rng: np.random.Generator, spec: SyntheticSpec) -> None:
    lo, hi = spec.image_side
    h, w = (int(s) for s in rng.integers(lo, hi + 1, 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def write_synthetic_sft(root: str | Path, n: int, *, seed: int = 0, fmt: str = "jsonl",
                        spec: SyntheticSpec | None = None) -> Path:
    """Write `n` records to `root/sft.{jsonl,json}` and their PNGs under `root/imgs/`; return the data path."""
    if fmt not in ("jsonl", "json"):
        raise ValueError(f"fmt must be 'jsonl' or 'json', got {fmt!r}")
    spec = spec or SyntheticSpec()
    root = Path(root)
    rng = np.random.default_rng(seed)
    records = [synthetic_record(rng, i, spec) for i in range(n)]
    for record in records:
        for rel in record["images"]:
            write_png(root / rel, rng, spec)
    path = root / f"sft.{fmt}"
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
