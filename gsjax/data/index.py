"""The record index: each record's token length and vision rows, or why it is refused, before training.

Measuring is cheap (text tokenisation and image headers, no pixel decoding) and runs in the grain workers.
Bad records are found here, so under `on_bad_record="error"` a broken file fails at start-up, not mid-epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from gsjax.data.encode import EncodeContext, measure_record
from gsjax.data.pipeline import map_range
from gsjax.data.records import RecordFile
from gsjax.data.skips import BadRecord, SkipCounter, refuse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """One record's measurement: length/rows, or (-1, 0) with the refusal's kind and message."""

    index: int
    length: int
    vision_rows: int
    kind: str | None = None
    message: str | None = None


class MeasureRecord:
    """Picklable `index -> Measurement` for grain workers."""

    def __init__(self, records: RecordFile, ctx: EncodeContext):
        self.records = records
        self.ctx = ctx

    def __call__(self, index: int) -> Measurement:
        try:
            info = measure_record(self.records[index], self.ctx)
        except BadRecord as bad:
            return Measurement(index, -1, 0, bad.kind, bad.message)
        return Measurement(index, info.length, info.vision_rows)


@dataclass
class RecordIndex:
    lengths: np.ndarray  # (N,) int64, -1 where refused
    vision_rows: np.ndarray  # (N,) int64
    skips: SkipCounter = field(default_factory=SkipCounter)

    @property
    def num_valid(self) -> int:
        return int((self.lengths >= 0).sum())


def build_index(records: RecordFile, ctx: EncodeContext, *, on_bad_record: str = "skip", worker_count: int = 0,
                max_logged_skips: int = 20) -> RecordIndex:
    """Measure every record; apply the bad-record policy in record order (so "error" names the first one)."""
    n = len(records)
    lengths = np.full(n, -1, np.int64)
    rows = np.zeros(n, np.int64)
    skips = SkipCounter()
    stream = map_range(MeasureRecord(records, ctx), 0, n, worker_count=worker_count, worker_buffer_size=16)
    iterator = iter(stream)
    try:
        for m in iterator:
            if m.kind is None:
                lengths[m.index], rows[m.index] = m.length, m.vision_rows
                continue
            refuse(BadRecord(m.kind, m.message or ""), records.name(m.index), on_bad_record,
                   quiet=skips.total >= max_logged_skips)
            skips.add(m.kind)
    finally:
        getattr(iterator, "close", lambda: None)()
    if skips.total > max_logged_skips:
        log.warning("skipped %d of %d records of %s (only the first %d logged): %s", skips.total, n, records.path,
                    max_logged_skips, skips.as_dict())
    return RecordIndex(lengths=lengths, vision_rows=rows, skips=skips)
