"""Image generation for the demo's rewards and report: a fast client of the demo's image server that keeps
every generated image on disk, and the HEURISTIC dual rewarder for the report's scripted example."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


class RecordingGenerator:
    """The image-server client, keeping each generated image as `<folder>/<hash of gen_prompt>.png` so the
    report can show what the generator made of an episode's answer."""

    def __init__(self, inner: Any, folder: Path):
        self.inner, self.folder = inner, Path(folder)
        self._lock = threading.Lock()

    def generate(self, prompt: str, images: Sequence[bytes]) -> bytes:
        data = self.inner.generate(prompt, images)
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{_prompt_key(prompt)}.tmp"
            tmp.write_bytes(data)
            tmp.replace(generated_path(self.folder, prompt))
        return data


def generated_path(folder: Path, prompt: str) -> Path:
    return Path(folder) / f"{_prompt_key(prompt)}.png"


def image_client(url: str, steps: int) -> Any:
    from gsjax.imagegen.client import ImageServerClient
    from gsjax.imagegen.schema import GenerationOptions

    # one denoising step pair without CFG: the pipeline is random, so quality cannot improve with more
    return ImageServerClient(url, options=GenerationOptions(num_inference_steps=steps, true_cfg_scale=1.0))


def heuristic_rewarder(generator: Any, max_references: int) -> Any:
    from gsjax.rewards.dual import EpisodeRewarder, RewardConfig
    from gsjax.rewards.heuristic import HeuristicImageJudge, HeuristicTextJudge

    return EpisodeRewarder(RewardConfig(mode="dual", text_coef=0.5, max_references=max_references,
                                        generation_attempts=1), generator, HeuristicImageJudge(), HeuristicTextJudge())
