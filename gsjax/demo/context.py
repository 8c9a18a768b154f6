"""The demo's configuration, folder layout, persistent stage state and run context (shared by the stages and
the report inputs)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from gsjax.demo.report import StageRow
from gsjax.demo.services import ImageServer
from gsjax.fileio import atomic_write_text

STAGES = ("trajectories", "sft", "grpo", "report")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. Defaults take 6.1-6.4 minutes on a 2-core CPU (SFT about 4); tests shrink the step counts."""

    workdir: Path = Path("runs/demo")
    model_preset: str = "tiny"
    sft_steps: int = 500  # 400: seeds 0/1 answered 42/27 of 48 GRPO episodes (500: 46/47); 300: broken tool-call tags
    grpo_steps: int = 6
    sft_records: int | None = None  # None: every built-in trajectory (6 prompt wordings x 10 subjects)
    sft_lr: float = 1e-2  # 5e-3 was tried: no more reliable (sft_config)
    sft_seq_len: int = 1280  # one length bucket (one compiled step) that every record fits: 764-1201 tokens
    grpo_lr: float = 1e-4
    prompts_per_step: int = 2
    group_size: int = 4
    temperature: float = 0.5
    top_p: float = 0.9
    max_llm_calls: int = 4
    max_new_tokens_per_turn: int = 160
    max_context_tokens: int = 2048
    generator_steps: int = 2  # denoising steps of the tiny pipeline (random weights: more buys nothing)
    seed: int = 0
    fresh: bool = False  # delete what the work folder holds first, the compilation cache excepted

    def __post_init__(self) -> None:
        for name in ("sft_steps", "prompts_per_step", "group_size", "max_llm_calls", "max_new_tokens_per_turn",
                     "generator_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.grpo_steps < 0:
            raise ValueError(f"DemoConfig.grpo_steps must be >= 0, got {self.grpo_steps}")


@dataclass(frozen=True)
class Layout:
    """Where everything lives under the work folder."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def sft_hf(self) -> Path:
        return self.sft / "hf"

    @property
    def grpo(self) -> Path:
        return self.root / "grpo"

    @property
    def compile_cache(self) -> Path:
        """JAX's persistent compilation cache: a resumed or `--fresh` run loads the programs compiled before."""
        return self.root / "xla_cache"

    @property
    def pipeline(self) -> Path:
        return self.root / "tiny_image_pipeline"

    @property
    def generated(self) -> Path:
        return self.root / "generated"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def state(self) -> Path:
        return self.root / "demo_state.json"

    @property
    def server_log(self) -> Path:
        return self.root / "logs" / "image_server.log"


class DemoState:
    """Finished stages and what they produced, saved atomically after every stage."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict[str, Any]] = {}
        if path.is_file():
            self.stages = json.loads(path.read_text()).get("stages", {})

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.stages.get(stage)

    def mark(self, stage: str, **info: Any) -> None:
        self.stages[stage] = info
        self.save()

    def forget(self, stage: str) -> None:
        if self.stages.pop(stage, None) is not None:
            self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"stages": self.stages}, indent=1, default=str))


@dataclass
class DemoContext:
    """What the event hook sees: the config, the layout and the running image server (if any)."""

    config: DemoConfig
    layout: Layout
    state: DemoState
    console: Console
    server: ImageServer | None = None
    rows: list[StageRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
