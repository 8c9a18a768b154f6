"""Episodes' exact token records + advantages -> the padded host batches of one GRPO step.

Contract (the SFT contract of `gsjax.data.collate`, plus RL keys): `input_ids` int32 (B, L) right-padded,
`attention_mask` bool, `targets` = ids shifted left, `target_mask` float32 = loss mask shifted (position t
predicts token t+1: only sampled policy tokens are trained, tool/context tokens never), `positions`
(3, B, L) M-RoPE from the real image grids, `vision` the tower inputs over ALL images of the rows in row
order (upstream trained without pixels, agent.md §8 item 1), and:

- `old_logprobs` (B, L) float32: the rollout engine's logprob of `targets[:, t]`, 0 off the mask. They are
  the behaviour policy of every mini-batch of the step, so the PPO ratio moves after the first update.
- `rollout_logprobs` (B, L): the same values, kept apart so that a trainer that recomputes `old_logprobs`
  still has the engine's for truncated IS and mismatch metrics.
- `advantages` (B,) float32; `row_denominator` (B,) float32, each row's share of its mini-batch's loss
  denominator (`gsjax.train.losses.row_denominators`; always set by `build_rl_batches`), so accumulation
  over micro-batches is exact; `sample_index` (B,) int32 (-1 for padding rows); `ref_logprobs` when every
  sample has them.

Padding rows (to fill a micro-batch to a multiple of the batch shards) are all padding with mask 0,
advantage 0 and denominator 0 (agent.md §8 item 17). Micro-batches take rows longest first under a
padded-token budget per device, with lengths from a few buckets and row counts from a few sizes, to
limit compiled shapes. A row whose image placeholders disagree with its images raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gsjax.data.buckets import assign_buckets, vision_row_bucket
from gsjax.data.collate import collate
from gsjax.data.encode import EncodedExample
from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.processing.tokens import ENDOFTEXT_ID

from .advantages import ExcludedEpisodes
from .losses import GRPOLossConfig, row_denominators

if TYPE_CHECKING:
    from gsjax.agent.engine_policy import TokenRecord

OVER_LENGTH = "over_length"


class ImageTokenMismatch(ValueError):
    """A row's image placeholder tokens do not match the images it carries."""


@dataclass(frozen=True, eq=False)
class RLSample:
    """One episode as trained: its exact tokens and images, rollout logprobs and advantage."""

    example: EncodedExample
    rollout_logprobs: np.ndarray  # (n,) float32, logprob of token t (0 where the loss mask is 0)
    advantage: float
    episode_id: str = ""
    group_id: str = ""
    ref_logprobs: np.ndarray | None = None  # (n,) like rollout_logprobs
    weight_versions: tuple[str, ...] = ()  # of each sampled turn, for staleness accounting

    def __len__(self) -> int:
        return len(self.example)

    @property
    def loss_tokens(self) -> int:
        """Tokens the row trains on (token 0 is never predicted)."""
        return int(np.count_nonzero(self.example.loss_mask[1:]))


@dataclass(frozen=True)
class RLBatchConfig:
    """Shapes of the training batches. `max_tokens_per_device` bounds padded tokens per device per
    micro-batch (upstream: 37000 per GPU); `num_minibatches` optimizer updates per step."""

    buckets: tuple[int, ...] = (4096, 8192, 16384, 36864)
    max_tokens_per_device: int = 37_000
    num_minibatches: int = 1
    shuffle: bool = False
    seed: int = 0
    vision_row_buckets: tuple[int, ...] | None = None
    min_vision_rows: int = 64
    # micro-batches without images still get vision rows (all padding): one program serves both kinds
    vision_in_every_batch: bool = False
    # sizes K of the LM head's trained positions per row (None: 64, 96, 128, 192, ...); each K compiles anew
    loss_position_buckets: tuple[int, ...] | None = None
    pad_id: int = ENDOFTEXT_ID  # Qwen pads with <|endoftext|>

    def __post_init__(self) -> None:
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be increasing and non-empty, got {self.buckets}")
        if self.max_tokens_per_device <= 0 or self.num_minibatches <= 0:
            raise ValueError("max_tokens_per_device and num_minibatches must be positive")
        for name in ("vision_row_buckets", "loss_position_buckets"):
            sizes = getattr(self, name)
            if sizes is not None and (not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] <= 0):
                raise ValueError(f"{name} must be increasing positive sizes (or null), got {sizes}")


@dataclass(frozen=True)
class MicroPlan:
    """One micro-batch: sample indices per row (-1 = padding row) and the padded length."""

    rows: np.ndarray
    length: int


@dataclass
class RLBatches:
    """A step's mini-batches (each a list of micro-batches) and the samples left out."""

    minibatches: list[list[dict[str, Any]]]
    excluded: ExcludedEpisodes = field(default_factory=ExcludedEpisodes)


# ---------------------------------------------------------------------------------------------- samples


def check_image_tokens(input_ids: np.ndarray, pixel_values: np.ndarray | None, image_grid_thw: np.ndarray | None,
                       model_cfg: Qwen3VLConfig) -> None:
    """Raise unless each run of image pads matches one image's grid, in order, and the pixels match the grids."""
    ids = np.asarray(input_ids)
    if np.any(ids == model_cfg.video_token_id):
        raise ImageTokenMismatch("video tokens are not supported in RL batches")
    pads = np.flatnonzero(ids == model_cfg.image_token_id)
    runs = np.split(pads, np.flatnonzero(np.diff(pads) != 1) + 1) if pads.size else []
    lengths = [int(r.size) for r in runs]
    grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    expected = [int(np.prod(g)) // model_cfg.vision.merge_unit for g in grid]
    if lengths != expected:
        raise ImageTokenMismatch(f"image pad runs {lengths} do not match the images' token counts {expected} "
                                 "(the trained row must carry every image it shows the model)")
    rows = 0 if pixel_values is None else int(np.asarray(pixel_values).shape[0])
    if rows != int(grid.prod(axis=1).sum()):
        raise ImageTokenMismatch(f"{rows} pixel rows for grids {grid.tolist()}")


def rl_sample(record: TokenRecord, advantage: float, model_cfg: Qwen3VLConfig, *, episode_id: str = "",
              group_id: str = "", ref_logprobs: np.ndarray | None = None) -> RLSample:
    """An episode's token record (exact sampled ids, mask, logprobs, all images) as a training sample."""
    arrays = record.to_arrays()
    ids, mask, logprobs = arrays["input_ids"], arrays["loss_mask"], arrays["rollout_logprobs"]
    if not (ids.shape == mask.shape == logprobs.shape):
        raise ValueError(f"token record arrays disagree: {ids.shape}, {mask.shape}, {logprobs.shape}")
    if not np.isfinite(advantage):
        raise ValueError(f"episode {episode_id!r} has a non-finite advantage (an excluded episode?)")
    example = EncodedExample(ids, mask.astype(np.int8), arrays.get("pixel_values"), arrays.get("image_grid_thw"))
    check_image_tokens(ids, example.pixel_values, example.image_grid_thw, model_cfg)
    ref = None if ref_logprobs is None else np.asarray(ref_logprobs, np.float32)
    return RLSample(example, logprobs.astype(np.float32), float(advantage), episode_id, group_id, ref,
                    tuple(record.weight_versions))


# ---------------------------------------------------------------------------------------------- planning


def split_minibatches(num_samples: int, num_minibatches: int, shuffle: bool = False, seed: int = 0,
                      keep_empty: bool = False) -> list[np.ndarray]:
    """Sample indices of each mini-batch: near-equal contiguous chunks of the (optionally shuffled) order.
    `keep_empty`: exactly `num_minibatches` chunks, empty ones included (a host with fewer samples than the
    step's mini-batches still takes part in each update)."""
    if not keep_empty and num_minibatches > max(num_samples, 1):
        raise ValueError(f"{num_minibatches} mini-batches for {num_samples} samples")
    order = np.random.default_rng(seed).permutation(num_samples) if shuffle else np.arange(num_samples)
    return [chunk for chunk in np.array_split(order, num_minibatches) if chunk.size or keep_empty]


def _size_bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (2^k and 3·2^(k-1)) that holds n: few shapes, < 1/3 waste."""
    size = 1
    while size < n:
        size = size * 3 // 2 if size >= 2 and size & (size - 1) == 0 else 1 << size.bit_length()
    return size


def plan_micro_batches(lengths: np.ndarray, buckets: Sequence[int], max_tokens_per_device: int,
                       parts: int = 1) -> list[MicroPlan]:
    """Rows longest first, each micro-batch padded to its longest row's bucket, at most
    `max_tokens_per_device` padded tokens per device (but always at least one row per device), row count a
    multiple of `parts` (the batch shards) from a few sizes."""
    lengths = np.asarray(lengths, np.int64)
    bucket_of = assign_buckets(lengths, tuple(buckets))
    if np.any(bucket_of < 0):
        raise ValueError(f"rows of length {lengths[bucket_of < 0].tolist()} exceed the largest bucket {buckets[-1]}")
    order = np.argsort(-lengths, kind="stable")
    plans, start = [], 0
    while start < order.size:
        length = int(buckets[bucket_of[order[start]]])
        per_device = max(1, max_tokens_per_device // length)
        take = order[start:start + per_device * parts]
        rows = min(_size_bucket(-(-take.size // parts)), per_device) * parts
        plans.append(MicroPlan(np.concatenate([take, np.full(rows - take.size, -1, np.int64)]), length))
        start += take.size
    return plans


# ---------------------------------------------------------------------------------------------- collation


def _shift_left(values: Sequence[np.ndarray | None], length: int, target_mask: np.ndarray) -> np.ndarray:
    """(B, L) float32 with row r's value of token t+1 at position t, 0 wherever the target is not trained."""
    out = np.zeros((len(values), length), np.float32)
    for r, v in enumerate(values):
        if v is not None and v.size > 1:
            out[r, : v.size - 1] = v[1:]
    return np.where(target_mask > 0, out, 0.0).astype(np.float32)


def collate_rl(samples: Sequence[RLSample | None], length: int, model_cfg: Qwen3VLConfig,
               denominators: Sequence[float] | None = None, cfg: RLBatchConfig | None = None,
               sample_index: Sequence[int] | None = None, vision_rows: int | None = None) -> dict[str, Any]:
    """Stack samples (None = padding row) into one (B, `length`) RL batch with all their images.
    `denominators`: each row's share of its mini-batch's loss denominator (see `build_rl_batches`);
    `vision_rows`: pad the image rows to this many (0: no vision input), else to the configured bucket."""
    cfg = cfg or RLBatchConfig()
    for s in samples:
        if s is not None:
            check_image_tokens(s.example.input_ids, s.example.pixel_values, s.example.image_grid_thw, model_cfg)
    needed = _vision_rows(samples, cfg)
    if vision_rows is not None and vision_rows < needed:
        raise ValueError(f"{vision_rows} vision rows for images that need {needed}")
    rows = (vision_rows if vision_rows is not None else needed) or None
    batch = collate([None if s is None else s.example for s in samples], length, rows, model_cfg, cfg.pad_id,
                    cfg.loss_position_buckets)
    mask = batch["target_mask"]
    logprobs = [None if s is None else s.rollout_logprobs for s in samples]
    batch["old_logprobs"] = _shift_left(logprobs, length, mask)
    batch["rollout_logprobs"] = batch["old_logprobs"].copy()
    real = [s for s in samples if s is not None]
    if real and all(s.ref_logprobs is not None for s in real):
        batch["ref_logprobs"] = _shift_left([None if s is None else s.ref_logprobs for s in samples], length, mask)
    batch["advantages"] = np.asarray([0.0 if s is None else s.advantage for s in samples], np.float32)
    if denominators is not None:  # absent: the loss uses this batch's own denominator
        batch["row_denominator"] = np.asarray(denominators, np.float32)
    index = range(len(samples)) if sample_index is None else sample_index
    batch["sample_index"] = np.asarray([i if s is not None else -1 for i, s in zip(index, samples)], np.int32)
    return batch


@dataclass(frozen=True)
class MicroShape:
    """The shape of one micro-batch as compiled: rows, padded length, vision rows (0: no images)."""

    rows: int
    length: int
    vision_rows: int


class HostAgreement(Protocol):
    """How the hosts of a multi-process run agree on a step's batches (`gsjax.train.grpo_hosts.ProcessAgreement`):
    each host builds its own rows, but every update must see the same global shapes on every host."""

    def totals(self, local: Sequence[int]) -> list[int]:
        """Elementwise sums over hosts."""

    def shapes(self, local: Sequence[Sequence[MicroShape]]) -> list[list[MicroShape]]:
        """Per mini-batch, the micro-batch shapes every host uses: per length, the most micro-batches any
        host has of it, each with at least the rows and vision rows of any host's micro-batch in that slot."""


def _vision_rows(samples: Sequence[RLSample | None], cfg: RLBatchConfig) -> int:
    rows = sum(s.example.vision_rows for s in samples if s is not None)
    if not rows and not cfg.vision_in_every_batch:
        return 0
    return vision_row_bucket(max(rows, 1), cfg.vision_row_buckets, cfg.min_vision_rows)


def build_rl_batches(samples: Sequence[RLSample], model_cfg: Qwen3VLConfig, loss_cfg: GRPOLossConfig,
                     cfg: RLBatchConfig | None = None, parts: int = 1, hosts: HostAgreement | None = None
                     ) -> RLBatches:
    """All micro-batches of one step: rows over the largest bucket are excluded (counted), the rest split
    into `cfg.num_minibatches` mini-batches, each with its own denominator shares, then micro-batched.

    With `hosts` (multi-host GRPO) `samples` are this host's and `parts` its share of the batch shards: the
    mini-batch count follows the samples of all hosts, and each micro-batch is padded (rows, vision rows;
    all-padding micro-batches where a host has fewer) to the shapes the hosts agree on, this host's
    micro-batches of each length taking that length's agreed slots in order."""
    cfg = cfg or RLBatchConfig()
    excluded = ExcludedEpisodes()
    fits = [i for i, s in enumerate(samples) if len(s) <= cfg.buckets[-1]]
    if len(fits) < len(samples):
        excluded.add(OVER_LENGTH, len(samples) - len(fits))
    everywhere = len(fits) if hosts is None else hosts.totals([len(fits)])[0]
    chunks = split_minibatches(len(fits), min(cfg.num_minibatches, max(everywhere, 1)), cfg.shuffle, cfg.seed,
                               keep_empty=hosts is not None)
    rows_everywhere = [len(c) for c in chunks] if hosts is None else hosts.totals([len(c) for c in chunks])
    plans: list[list[list[int]]] = []  # per mini-batch, per micro-batch: sample index per row (-1: padding)
    lengths: list[list[int]] = []
    shares: dict[int, float] = {}
    for chunk, total_rows in zip(chunks, rows_everywhere):
        members = [fits[i] for i in chunk]
        tokens = np.asarray([samples[i].loss_tokens for i in members])
        shares.update(zip(members, row_denominators(tokens, loss_cfg, total_rows).tolist()))
        micro = plan_micro_batches(np.asarray([len(samples[i]) for i in members]), cfg.buckets,
                                   cfg.max_tokens_per_device, parts) if members else []
        plans.append([[members[j] if j >= 0 else -1 for j in plan.rows] for plan in micro])
        lengths.append([plan.length for plan in micro])
    local = [[MicroShape(len(index), length, _vision_rows([samples[i] for i in index if i >= 0], cfg))
              for index, length in zip(plan, plan_lengths)] for plan, plan_lengths in zip(plans, lengths)]
    agreed = local if hosts is None else hosts.shapes(local)
    minibatches = []
    for plan, plan_lengths, shapes in zip(plans, lengths, agreed):
        queued: dict[int, list[list[int]]] = {}  # this host's micro-batches of each length, in plan order
        for index, length in zip(plan, plan_lengths):
            queued.setdefault(length, []).append(index)
        micro = []
        for shape in shapes:
            waiting = queued.get(shape.length)
            index = waiting.pop(0) if waiting else []
            if len(index) > shape.rows:
                raise ValueError(f"a micro-batch of {len(index)} rows does not fit the agreed {shape}")
            index = index + [-1] * (shape.rows - len(index))
            rows = [samples[i] if i >= 0 else None for i in index]
            micro.append(collate_rl(rows, shape.length, model_cfg, [shares.get(i, 0.0) for i in index], cfg, index,
                                    vision_rows=shape.vision_rows))
        if any(queued.values()):
            raise ValueError("the agreed shapes leave some of this host's micro-batches out")
        minibatches.append(micro)
    return RLBatches(minibatches, excluded)
