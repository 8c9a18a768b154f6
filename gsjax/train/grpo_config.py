"""The GRPO run config: the SFT sections (model, mesh, rules, optim, train) plus what RL adds: prompts,
rollout engine, episode environment, reward, advantage, policy loss and batch shapes.

It reuses the SFT config machinery (`_build`, `apply_overrides`, type coercion, the model / optimizer /
train checks of `_problems`), so YAML recipes and `a.b.c=value` overrides behave exactly as for `gsjax
sft`, and a typo is an error naming the key. Defaults are upstream's RL run (spec training_and_eval.md
§3.1) where it has one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gsjax.agent.config import AgentConfig
from gsjax.models.qwen3_vl.config import Qwen3VLConfig, VisionConfig
from gsjax.parallel.mesh import MeshConfig
from gsjax.parallel.sharding import MeshAxes, Rules, rules_from_config
from gsjax.processing.frame_rows import largest_agent_frame
from gsjax.processing.images import ImageProcessorConfig

from .config import ModelSection, OptimSection, SFTConfigError, TrainSection, _build, _plain, _problems, read_recipe
from .config import apply_overrides as _apply_overrides
from .losses import GRPOLossConfig
from .rl_batch import RLBatchConfig


class GRPOConfigError(SFTConfigError):
    """An unknown key, a value of the wrong type, or an inconsistent GRPO setting."""


@dataclass(frozen=True)
class DataSection:
    """RL prompts (spec §5.2): a JSON array / JSONL of {id, prompt, gt_image}; `gt_image` relative to
    `image_root`. Shuffled per epoch with `seed` (upstream 42); the last partial batch is dropped.
    `path: corpus` makes one task per image of the offline corpus (env.local_corpus_dir). With `path` unset,
    the toy environment makes `synthetic_prompts` prompts of its own."""

    path: str | None = None
    image_root: str | None = None  # default: the folder of `path`
    shuffle: bool = True
    seed: int = 42
    synthetic_prompts: int = 64


@dataclass(frozen=True)
class RolloutSection:
    """The rollout engine and sampling. `engine: jax` is the embedded sampler on the learner's devices
    (`rollout_devices` > 0 puts it on the last devices instead, disjoint from the learner's); `sglang`
    talks to a sidecar at `sglang_url` and syncs weights through an HF export under the run folder."""

    engine: Literal["jax", "sglang"] = "jax"
    group_size: int = 6  # n rollouts per prompt
    prompts_per_step: int = 8
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = -1
    seed: int = 0  # sampling seeds derive from (seed, step, prompt id, rollout index, turn)
    max_slots: int = 16
    max_total_len: int = 36_864  # KV length per slot: covers env.max_context_tokens
    min_prefill_bucket: int = 64
    max_prefill_tokens: int = 16384
    min_prefill_rows: int = 1  # prefill rows padded to powers of two from here: fewer programs to compile
    decode_window_splits: int = 2  # decode windows per octave of cache length (1: fewer programs, longer reads)
    prefix_reuse: bool = True  # a turn prefills only what follows the history its slot still holds
    rollout_devices: int = 0  # 0: share the learner's mesh
    concurrency: int = 64  # episodes in flight
    sglang_url: str = "http://127.0.0.1:30000"
    sglang_timeout_s: float = 600.0


@dataclass(frozen=True)
class EnvSection:
    """What an episode is. `agent`: the multi-turn Gen-Searcher agent with its tools (spec agent.md);
    `toy`: a single policy call whose reward is the share of sampled ids in [toy_target_low,
    toy_target_high) (a learning check that needs no tokenizer, judge or generator)."""

    kind: Literal["agent", "toy"] = "agent"
    max_llm_calls: int = 9
    max_new_tokens_per_turn: int = 4096
    max_context_tokens: int = 36_000
    max_reference_images: int = 3
    image_max_pixels: int = 160_000
    image_min_pixels: int = 65_536
    date: str = "2025-06-01"  # fixed, so prompts (and resumed runs) do not change with the calendar
    system_prompt: Literal["full", "compact"] = "full"  # the agent's prompt style (gsjax/agent/prompts.py)
    tools_backend: Literal["local", "serper"] = "local"
    local_corpus_dir: str | None = None  # None: the built-in offline corpus
    keep_episode_dirs: bool = True
    toy_prompt_len: int = 8
    toy_new_tokens: int = 4
    toy_target_low: int = 0
    toy_target_high: int = 32

    def agent_config(self, concurrency: int) -> AgentConfig:
        """The agent loop's budgets, image sizes, date and prompt style for this environment's episodes."""
        return AgentConfig(max_llm_calls=self.max_llm_calls, max_new_tokens_per_turn=self.max_new_tokens_per_turn,
                           max_reference_images=self.max_reference_images, image_max_pixels=self.image_max_pixels,
                           image_min_pixels=self.image_min_pixels, date=self.date, episode_concurrency=concurrency,
                           system_prompt=self.system_prompt)

    def image_processor(self, vision: VisionConfig) -> ImageProcessorConfig:
        """The processor of the policy's views: the tower's patch geometry, this section's pixel range."""
        return ImageProcessorConfig(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                    merge_size=vision.spatial_merge_size, min_pixels=self.image_min_pixels,
                                    max_pixels=self.image_max_pixels)


@dataclass(frozen=True)
class RewardSection:
    """The dual reward (spec §2). `judge: heuristic` is the OFFLINE heuristic backend (labelled, not a
    judge model); `generator: reference` returns the first reference image (OFFLINE stand-in) — both for
    CPU runs and tests only."""

    mode: Literal["dual", "image", "text"] = "dual"
    text_coef: float = 0.5
    judge: Literal["openai", "heuristic"] = "openai"
    judge_base_url: str = "https://api.openai.com/v1"
    judge_model: str = "gpt-4.1"
    judge_api_key_env: str = "GEN_REWARD_API_KEY"
    judge_max_attempts: int = 30
    generator: Literal["server", "openai", "reference"] = "server"
    generator_urls: tuple[str, ...] = ("http://127.0.0.1:8000",)
    generator_model: str = "gpt-image-1"
    generator_api_key_env: str = "OPENAI_API_KEY"
    generation_attempts: int = 3
    min_references: int = 1
    workers: int = 32


@dataclass(frozen=True)
class AdvantageSection:
    """Group advantages (spec §3.2, §3.5). `old_logprobs: recompute` runs the learner over the batch before
    the first update (verl's behaviour); `rollout` uses the engine's logprobs (no extra pass)."""

    norm_by_std: bool = True
    eps: float = 1e-6
    all_equal: Literal["zero", "drop"] = "zero"
    drop_nonpositive: bool = False  # upstream's mask of reward <= 0 (off: zero rewards stay in the loss)
    old_logprobs: Literal["recompute", "rollout"] = "recompute"


@dataclass(frozen=True)
class GRPOOptimSection(OptimSection):
    """Upstream RL: AdamW lr 1e-6 constant, no warmup, weight decay 0.01, grad-norm clip 1.0 (§3.1)."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    schedule: Literal["cosine", "linear", "constant"] = "constant"


@dataclass(frozen=True)
class GRPOTrainSection(TrainSection):
    """`steps` or `epochs` count GRPO steps (one rollout batch each); upstream: 5 epochs, checkpoint every 20."""

    checkpoint_every: int = 20
    out_dir: str = "runs/grpo"


@dataclass(frozen=True)
class GRPOConfig:
    model: ModelSection = field(default_factory=ModelSection)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    rules: tuple[tuple[str, MeshAxes], ...] | None = None
    optim: GRPOOptimSection = field(default_factory=GRPOOptimSection)
    train: GRPOTrainSection = field(default_factory=lambda: GRPOTrainSection(epochs=5))
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    env: EnvSection = field(default_factory=EnvSection)
    reward: RewardSection = field(default_factory=RewardSection)
    advantage: AdvantageSection = field(default_factory=AdvantageSection)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    batch: RLBatchConfig = field(default_factory=RLBatchConfig)

    def sharding_rules(self) -> Rules:
        return rules_from_config(self.rules)

    def model_config(self) -> Qwen3VLConfig:
        """The model config; `model.vision_max_frame_rows: auto` becomes the largest frame a policy view can
        have (env.image_min_pixels / image_max_pixels)."""
        e = self.env
        return self.model.resolve(lambda config: largest_agent_frame(
            e.image_min_pixels, e.image_max_pixels, e.image_processor(config.vision)))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> GRPOConfig:
        try:
            built = _build(cls, raw, "")
        except (ValueError, TypeError) as e:  # a section's own __post_init__ check (loss, batch)
            if isinstance(e, SFTConfigError):
                raise
            raise GRPOConfigError(f"invalid GRPO config: {e}") from e
        return built.validate()

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def validate(self) -> GRPOConfig:
        problems = _problems(self)  # type: ignore[arg-type]  # model / mesh / rules / optim / train checks
        problems += _grpo_problems(self)
        if problems:
            raise GRPOConfigError("invalid GRPO config:\n  " + "\n  ".join(problems))
        return self


def _grpo_problems(c: GRPOConfig) -> list[str]:
    out: list[str] = []
    r, e, w = c.rollout, c.env, c.reward
    if c.train.grad_accum != 1:
        out.append("train.grad_accum must be 1 for GRPO: micro-batches come from batch.max_tokens_per_device")
    if r.group_size < 1 or r.prompts_per_step < 1:
        out.append(f"rollout.group_size and rollout.prompts_per_step must be >= 1, got {r.group_size}, "
                   f"{r.prompts_per_step}")
    if r.temperature < 0 or not 0 < r.top_p <= 1:
        out.append(f"rollout: need temperature >= 0 and 0 < top_p <= 1, got {r.temperature}, {r.top_p}")
    if r.max_slots < 1 or r.concurrency < 1 or r.rollout_devices < 0:
        out.append("rollout.max_slots and rollout.concurrency must be >= 1, rollout.rollout_devices >= 0")
    if c.batch.num_minibatches > r.prompts_per_step * r.group_size:
        out.append(f"batch.num_minibatches={c.batch.num_minibatches} exceeds the "
                   f"{r.prompts_per_step * r.group_size} rollouts of a step")
    if e.kind == "toy":
        if e.toy_prompt_len < 1 or e.toy_new_tokens < 1 or not 0 <= e.toy_target_low < e.toy_target_high:
            out.append("env: toy_prompt_len, toy_new_tokens >= 1 and 0 <= toy_target_low < toy_target_high")
    else:
        if not c.data.path:
            out.append("data.path is required for env.kind=agent (the RL records, spec §5.2)")
        if e.max_llm_calls < 1 or e.max_new_tokens_per_turn < 1:
            out.append("env.max_llm_calls and env.max_new_tokens_per_turn must be >= 1")
        if c.rollout.engine == "jax" and e.max_context_tokens > r.max_total_len:
            out.append(f"env.max_context_tokens={e.max_context_tokens} exceeds the sampler's "
                       f"rollout.max_total_len={r.max_total_len}")
    if not 0 <= w.text_coef <= 1 or w.workers < 1 or w.generation_attempts < 1:
        out.append("reward: need 0 <= text_coef <= 1, workers >= 1, generation_attempts >= 1")
    if not w.generator_urls and w.generator in ("server", "openai"):
        out.append("reward.generator_urls must name at least one URL")
    return out


def load_grpo_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> GRPOConfig:
    """Read a YAML recipe (or start from defaults) and apply `a.b.c=value` overrides in order."""
    return GRPOConfig.from_dict(_apply_overrides(read_recipe(path, GRPOConfigError), overrides, root=GRPOConfig))


def replace_section(cfg: GRPOConfig, section: str, **changes: Any) -> GRPOConfig:
    """A copy with one section's fields changed (for tests and scripts), validated again."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)}).validate()
