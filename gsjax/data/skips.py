"""Bad SFT records: the typed reason a record is refused, and the counts that make skips observable.

A record is refused with `BadRecord(kind, message)`; the loader either counts and logs it (`skip`, the default)
or re-raises it as `BadRecordError` naming the record (`error`). Counting happens in `SkipCounter`, which is
a plain JSON-able tally so it can travel in batches and in the loader's checkpoint state.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

from gsjax.errors import InputError

log = logging.getLogger(__name__)

BAD_FORMAT = "bad_format"  # not an object, no messages, non-string content, unknown role
BAD_TURNS = "bad_turns"  # broken role order, odd number of turns, misplaced system message
IMAGE_COUNT = "image_count"  # number of <image> placeholders != len(images)
IMAGE_PLACEMENT = "image_placement"  # an <image> placeholder in a system or assistant turn
MISSING_IMAGE = "missing_image"  # an image file does not exist
BAD_IMAGE = "bad_image"  # an image file cannot be read or decoded, or has an impossible size
TOO_LONG = "too_long"  # the encoded sequence is longer than the cutoff
ENCODE_ERROR = "encode_error"  # the chat encoder refused the conversation, or lengths disagree

SKIP_KINDS = (BAD_FORMAT, BAD_TURNS, IMAGE_COUNT, IMAGE_PLACEMENT, MISSING_IMAGE, BAD_IMAGE, TOO_LONG, ENCODE_ERROR)
ON_BAD_RECORD = ("skip", "error")


class BadRecord(ValueError):
    """One record cannot be trained on; `kind` is one of SKIP_KINDS."""

    def __init__(self, kind: str, message: str):
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown bad-record kind {kind!r}; expected one of {SKIP_KINDS}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across grain worker processes
        return type(self), (self.kind, self.message)


class BadRecordError(InputError, ValueError):
    """Raised under `on_bad_record="error"`: names the record and why it was refused."""

    def __init__(self, record_name: str, bad: BadRecord):
        super().__init__(f"{record_name}: {bad}")
        self.record_name = record_name
        self.bad = bad
        self.kind = bad.kind

    def __reduce__(self) -> tuple[type, tuple[str, BadRecord]]:  # picklable across grain worker processes
        return type(self), (self.record_name, self.bad)


def refuse(bad: BadRecord, record_name: str, on_bad_record: str, *, quiet: bool = False) -> None:
    """Apply the bad-record policy: raise under "error", else log (unless `quiet`); the caller counts."""
    if on_bad_record == "error":
        raise BadRecordError(record_name, bad) from bad
    if not quiet:
        log.warning("skipping %s: %s", record_name, bad)


class SkipCounter:
    """Skipped records by kind; JSON-able through `as_dict` / `from_dict`."""

    def __init__(self, counts: Mapping[str, int] | None = None):
        self._counts: Counter[str] = Counter({k: int(v) for k, v in (counts or {}).items() if int(v)})

    def add(self, kind: str, n: int = 1) -> None:
        self._counts[kind] += n

    def update(self, counts: Mapping[str, int]) -> None:
        for kind, n in counts.items():
            if n:
                self._counts[kind] += int(n)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        return {kind: self._counts[kind] for kind in sorted(self._counts)}

    @classmethod
    def from_dict(cls, counts: Mapping[str, int]) -> SkipCounter:
        return cls(counts)

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"
