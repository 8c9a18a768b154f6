"""RL prompts for GRPO (spec training_and_eval.md §5.2) and a resumable position over them.

Each step takes the next `prompts_per_step` prompts of the epoch's order (a permutation seeded by
(seed, epoch) when shuffling); the last partial batch of an epoch is dropped, as upstream does. The
position is two integers, saved in every checkpoint, so a resumed run takes exactly the prompts the
interrupted one would have taken next.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gsjax.errors import RecordFileError
from gsjax.fileio import read_json_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One RL task: `question` is the user request, `gt_image` the ground-truth image's absolute path."""

    id: str
    question: str
    gt_image: str | None = None


def read_rl_records(path: str | Path, image_root: str | Path | None = None) -> tuple[list[Prompt], dict[str, int]]:
    """Prompts from a JSON array or JSONL of {id, prompt|question, gt_image}; items missing a field or whose
    image is absent are skipped and counted by reason."""
    path = Path(path)
    items = read_json_records(path, "RL prompt file")
    root = Path(image_root) if image_root else path.parent
    prompts: list[Prompt] = []
    skipped: dict[str, int] = {}
    for item in items:
        question = item.get("prompt") or item.get("question") if isinstance(item, dict) else None
        if not isinstance(item, dict) or item.get("id") is None or not question or not item.get("gt_image"):
            skipped["missing_field"] = skipped.get("missing_field", 0) + 1
            continue
        image = Path(item["gt_image"])
        image = image if image.is_absolute() else root / image
        if not image.is_file():
            skipped["image_missing"] = skipped.get("image_missing", 0) + 1
            continue
        prompts.append(Prompt(str(item["id"]), str(question), str(image)))
    if skipped:
        log.warning("%s: skipped %s", path, skipped)
    return prompts, skipped


CORPUS_SOURCE = "corpus"  # data.path value: prompts made from the offline corpus' images (no files needed)


def corpus_prompts(corpus_dir: str | Path | None = None) -> list[Prompt]:
    """One RL task per image of the offline corpus: draw the captioned subject; the image is the ground
    truth. For CPU runs and tests with the local tools (the agent can find the very image it must match)."""
    from gsjax.agent.tools.local import BUILTIN_CORPUS

    root = Path(corpus_dir) if corpus_dir else BUILTIN_CORPUS
    prompts = []
    for i, line in enumerate((root / "images.jsonl").read_text().splitlines()):
        if line.strip():
            item = json.loads(line)
            prompts.append(Prompt(f"corpus{i}", f"Create an image of the {item['title']}: {item['caption']}",
                                  str(root / "images" / item["file"])))
    return prompts


def synthetic_prompts(count: int) -> list[Prompt]:
    """Prompts for the toy environment (it derives token ids from the id)."""
    return [Prompt(f"toy{i}", f"toy prompt {i}") for i in range(count)]


@dataclass
class PromptStream:
    """The run's prompts in order: epoch by epoch, `batch_size` at a time, with a saveable position."""

    prompts: Sequence[Prompt]
    batch_size: int
    shuffle: bool = True
    seed: int = 42
    epoch: int = 0
    index: int = 0  # batches taken in this epoch
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            skipped = f" ({sum(self.skipped.values())} skipped: {self.skipped})" if self.skipped else ""
            raise RecordFileError(f"{len(self.prompts)} usable prompts{skipped} do not fill one step's "
                                  f"{self.batch_size} (rollout.prompts_per_step)")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.prompts) // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.prompts))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def next_batch(self) -> list[Prompt]:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.batch_size
        chosen = self.order(self.epoch)[start:start + self.batch_size]
        self.index += 1
        return [self.prompts[int(i)] for i in chosen]

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state.get("epoch", 0)), int(state.get("index", 0))
