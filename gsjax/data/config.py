"""SFT input pipeline settings (spec training_and_eval.md §4.1/§4.2, §5.1)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gsjax.data.skips import ON_BAD_RECORD

DEFAULT_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class SFTDataConfig:
    """Where the SFT records are and how they become host batches.

    `max_pixels`/`min_pixels` are LLaMA-Factory's pre-shrink/pre-grow bounds applied before the processor's own
    smart-resize; `buckets` are the allowed sequence lengths (the cutoff is always the last one);
    `vision_row_buckets` the allowed vision patch-row counts per host batch (None: 64, 96, 128, 192, 256, ...);
    `loss_position_buckets` the allowed counts of trained positions per batch, the rows the LM head runs at
    (None: 64, 96, 128, 192, 256, ...; fewer sizes, fewer compiled steps)."""

    path: str
    image_root: str | None = None  # None: the data file's directory
    batch_size: int = 1  # per host
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    cutoff_len: int = 32768
    max_pixels: int = 160000
    min_pixels: int = 32 * 32
    shuffle: bool = True
    seed: int = 42
    num_epochs: int = 2
    drop_remainder: bool = False  # False: a bucket's last partial batch is filled with empty rows
    worker_count: int = 0  # grain worker processes; 0 = preprocess in the calling process
    worker_buffer_size: int = 2  # batches each worker prepares ahead
    index_worker_count: int | None = None  # workers for the start-up length pass; None = worker_count
    on_bad_record: str = "skip"  # "skip" (count + log) or "error" (raise naming the record)
    add_empty_think: bool = True  # upstream adds a trained empty <think> block to think-less assistant turns
    vision_row_buckets: tuple[int, ...] | None = None
    min_vision_rows: int = 64  # smallest automatic vision row bucket
    loss_position_buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))
        object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
        for name in ("vision_row_buckets", "loss_position_buckets"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(sorted(int(b) for b in getattr(self, name))))
        for name in ("batch_size", "cutoff_len", "max_pixels", "min_pixels", "num_epochs", "worker_buffer_size",
                     "min_vision_rows"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"SFTDataConfig.{name} must be positive, got {getattr(self, name)}")
        if self.worker_count < 0 or (self.index_worker_count or 0) < 0:
            raise ValueError(f"SFTDataConfig worker counts must be >= 0, got {self.worker_count}, "
                             f"{self.index_worker_count}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"SFTDataConfig.min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"SFTDataConfig.on_bad_record must be one of {ON_BAD_RECORD}, got {self.on_bad_record!r}")
        if not self.buckets or any(b <= 0 for b in self.buckets):
            raise ValueError(f"SFTDataConfig.buckets must be positive lengths, got {self.buckets}")
        if self.min_vision_rows % 4:
            raise ValueError(f"SFTDataConfig.min_vision_rows must be a multiple of 4, got {self.min_vision_rows}")
        if self.vision_row_buckets is not None and (
            not self.vision_row_buckets or any(b <= 0 or b % 4 for b in self.vision_row_buckets)
        ):
            raise ValueError(
                f"SFTDataConfig.vision_row_buckets must be positive multiples of 4, got {self.vision_row_buckets}"
            )
        if self.loss_position_buckets is not None and (
            not self.loss_position_buckets or any(b <= 0 for b in self.loss_position_buckets)
        ):
            raise ValueError(
                f"SFTDataConfig.loss_position_buckets must be positive counts, got {self.loss_position_buckets}"
            )

    @property
    def length_buckets(self) -> tuple[int, ...]:
        """Sorted distinct buckets up to the cutoff, with the cutoff itself last."""
        return tuple(sorted({b for b in self.buckets if b < self.cutoff_len} | {self.cutoff_len}))

    @property
    def index_workers(self) -> int:
        return self.worker_count if self.index_worker_count is None else self.index_worker_count

    @property
    def data_root(self) -> Path:
        """Directory that relative image paths are resolved against."""
        return Path(self.image_root) if self.image_root is not None else Path(self.path).parent

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SFTDataConfig:
        """Build from a recipe mapping; unknown keys are an error (a typo must not silently use a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SFT data settings {unknown}; known: {sorted(known)}")
        return cls(**values)
