"""The SFT loader: records -> index -> batch plan -> host batches built in grain workers.

Each host batch is a pure function of its step (`BatchBuilder`), computed in the workers (image decoding,
resizing, tokenisation, M-RoPE positions and vision tables all happen there, never in the train step). The
iterator position is the next step, so `get_state()` is a small JSON dict and `set_state()` rebuilds the grain
pipeline from that step: a resumed loader yields exactly the batches an uninterrupted one would, for any worker
count. The state also carries the encode-time skip counts and a fingerprint of the plan it belongs to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Self

import numpy as np

from gsjax.data.buckets import EMPTY, BatchPlan
from gsjax.data.collate import collate
from gsjax.data.config import SFTDataConfig
from gsjax.data.encode import EncodeContext, EncodedExample, encode_record
from gsjax.data.index import build_index
from gsjax.data.pipeline import map_range
from gsjax.data.records import RecordFile
from gsjax.data.skips import ENCODE_ERROR, BadRecord, SkipCounter, refuse
from gsjax.errors import RecordFileError
from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.processing.images import ImageProcessorConfig
from gsjax.processing.tokens import ENDOFTEXT_ID

STATE_VERSION = 1


def image_config_for(model_cfg: Qwen3VLConfig, image_cfg: ImageProcessorConfig | None) -> ImageProcessorConfig:
    """The processor config (hub defaults with the model's patch geometry), checked against the vision tower."""
    v = model_cfg.vision
    cfg = image_cfg or ImageProcessorConfig(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                            merge_size=v.spatial_merge_size)
    ours = (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size)
    theirs = (v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
    if ours != theirs:
        raise ValueError(f"image processor (patch, temporal, merge) {ours} does not match the vision tower {theirs}")
    return cfg


def owned(tree: Any) -> Any:
    """Plain numpy copies of arrays that grain handed over in shared memory, so the segments are released now
    rather than whenever the caller drops the batch (or at interpreter exit, with warnings)."""
    if isinstance(tree, dict):
        return {k: owned(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray) and type(tree) is not np.ndarray:
        return np.array(tree)
    return tree


class BatchBuilder:
    """Picklable `step -> host batch`, run inside grain workers."""

    def __init__(self, records: RecordFile, ctx: EncodeContext, plan: BatchPlan, model_cfg: Qwen3VLConfig, *,
                 process_index: int, pad_id: int, on_bad_record: str,
                 loss_position_buckets: tuple[int, ...] | None = None):
        self.records, self.ctx, self.plan = records, ctx, plan
        self.loss_position_buckets = loss_position_buckets
        self.model_cfg, self.process_index, self.pad_id = model_cfg, process_index, pad_id
        self.on_bad_record = on_bad_record

    def _encode(self, record_id: int) -> EncodedExample:
        example = encode_record(self.records[record_id], self.ctx)
        planned = (int(self.plan.lengths[record_id]), int(self.plan.vision_rows[record_id]))
        if (len(example), example.vision_rows) != planned:
            raise BadRecord(ENCODE_ERROR, f"encoded to {len(example)} tokens / {example.vision_rows} vision rows, "
                                          f"measured {planned[0]} / {planned[1]}")
        return example

    def __call__(self, step: int) -> dict[str, Any]:
        planned = self.plan.batch(step, self.process_index)
        skipped = SkipCounter()
        examples: list[EncodedExample | None] = []
        for record_id in planned.record_ids.tolist():
            if record_id == EMPTY:
                examples.append(None)
                continue
            try:
                examples.append(self._encode(record_id))
            except BadRecord as bad:
                refuse(bad, self.records.name(record_id), self.on_bad_record)
                skipped.add(bad.kind)
                examples.append(None)
        batch = collate(examples, planned.length, planned.vision_rows, self.model_cfg, self.pad_id,
                        self.loss_position_buckets)
        kept = [rid if e is not None else EMPTY for rid, e in zip(planned.record_ids.tolist(), examples)]
        batch["stats"] = {"step": step, "epoch": planned.epoch, "records": kept,
                          "rows": sum(e is not None for e in examples), "skipped": skipped.as_dict()}
        return batch


class SFTLoader:
    """Iterates this host's SFT batches over all epochs; `get_state`/`set_state` save and restore the position."""

    def __init__(self, cfg: SFTDataConfig, tokenizer: Any, model_cfg: Qwen3VLConfig, *,
                 image_config: ImageProcessorConfig | None = None, process_index: int = 0, process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
        self.cfg = cfg
        self.process_index, self.process_count = process_index, process_count
        records = RecordFile(cfg.path)
        ctx = EncodeContext.from_config(cfg, tokenizer, image_config_for(model_cfg, image_config),
                                        model_cfg.runtime.vision_max_frame_rows)
        self.index = build_index(records, ctx, on_bad_record=cfg.on_bad_record, worker_count=cfg.index_workers)
        if self.index.num_valid == 0:
            raise RecordFileError(f"no usable SFT record in {cfg.path}: all {len(records)} were refused "
                             f"({self.index.skips.as_dict()})")
        self.plan = BatchPlan(lengths=self.index.lengths, vision_rows=self.index.vision_rows,
                              buckets=cfg.length_buckets, batch_size=cfg.batch_size, process_count=process_count,
                              num_epochs=cfg.num_epochs, seed=cfg.seed, shuffle=cfg.shuffle,
                              drop_remainder=cfg.drop_remainder, vision_row_buckets=cfg.vision_row_buckets,
                              min_vision_rows=cfg.min_vision_rows)
        if self.plan.num_steps == 0:
            raise ValueError(f"{self.index.num_valid} usable records make no full batch of "
                             f"{self.plan.global_batch} (drop_remainder=True)")
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.builder = BatchBuilder(records, ctx, self.plan, model_cfg, process_index=process_index,
                                    pad_id=ENDOFTEXT_ID if pad_id is None else int(pad_id),
                                    on_bad_record=cfg.on_bad_record,
                                    loss_position_buckets=cfg.loss_position_buckets)
        self._next_step = 0
        self._runtime_skips = SkipCounter()
        self._iterator: Iterator[dict[str, Any]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def num_steps(self) -> int:
        """Batches this host yields over all epochs (the same on every host)."""
        return self.plan.num_steps

    @property
    def next_step(self) -> int:
        return self._next_step

    @property
    def stats(self) -> dict[str, Any]:
        """Record counts and skips: `index_skips` found before training, `runtime_skips` while encoding."""
        return {"records": int(self.index.lengths.size), "valid": self.index.num_valid,
                "index_skips": self.index.skips.as_dict(), "runtime_skips": self._runtime_skips.as_dict(),
                "skipped": self.index.skips.total + self._runtime_skips.total, "next_step": self._next_step,
                "num_steps": self.num_steps}

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._next_step >= self.num_steps:
            self.close()
            raise StopIteration
        if self._iterator is None:
            self._iterator = iter(map_range(self.builder, self._next_step, self.num_steps,
                                            worker_count=self.cfg.worker_count,
                                            worker_buffer_size=self.cfg.worker_buffer_size))
        batch = owned(next(self._iterator))
        if batch["stats"]["step"] != self._next_step:
            raise RuntimeError(f"expected step {self._next_step}, the pipeline produced {batch['stats']['step']}")
        self._next_step += 1
        self._runtime_skips.update(batch["stats"]["skipped"])
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next step to yield, skip counts so far, and the plan's fingerprint."""
        return {"version": STATE_VERSION, "next_step": self._next_step,
                "runtime_skips": self._runtime_skips.as_dict(), "plan": self.plan.fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses a state saved for a different data set or plan."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state.get("plan") != self.plan.fingerprint():
            raise ValueError(f"the loader state belongs to a different plan: saved {state.get('plan')}, "
                             f"current {self.plan.fingerprint()}")
        step = int(state["next_step"])
        if not 0 <= step <= self.num_steps:
            raise ValueError(f"saved next_step {step} outside [0, {self.num_steps}]")
        self.close()
        self._next_step = step
        self._runtime_skips = SkipCounter.from_dict(state.get("runtime_skips", {}))

    def close(self) -> None:
        """Stop the worker processes (the next `next()` restarts them from the current position)."""
        if self._iterator is not None:
            getattr(self._iterator, "close", lambda: None)()
            self._iterator = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_sft_loader(cfg: SFTDataConfig, tokenizer: Any, model_cfg: Qwen3VLConfig, *,
                    image_config: ImageProcessorConfig | None = None, process_index: int = 0,
                    process_count: int = 1) -> SFTLoader:
    """The SFT loader for this host. Pass `jax.process_index()` / `jax.process_count()` in multi-host runs."""
    return SFTLoader(cfg, tokenizer, model_cfg, image_config=image_config, process_index=process_index,
                     process_count=process_count)
