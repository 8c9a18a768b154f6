"""Input pipelines on grain. SFT: ShareGPT records with images -> bucketed, resumable host batches."""

from gsjax.data.buckets import BatchPlan, PlannedBatch, padding_waste
from gsjax.data.collate import collate
from gsjax.data.config import DEFAULT_BUCKETS, SFTDataConfig
from gsjax.data.encode import (
    EncodeContext,
    EncodedExample,
    encode_record,
    measure_record,
)
from gsjax.data.index import RecordIndex, build_index
from gsjax.data.loader import SFTLoader, make_sft_loader
from gsjax.data.records import ChatRecord, RecordFile, read_records, to_chat
from gsjax.data.skips import SKIP_KINDS, BadRecord, BadRecordError, SkipCounter
from gsjax.data.synthetic import SyntheticSpec, write_synthetic_sft

__all__ = [
    "DEFAULT_BUCKETS",
    "SKIP_KINDS",
    "BadRecord",
    "BadRecordError",
    "BatchPlan",
    "ChatRecord",
    "EncodeContext",
    "EncodedExample",
    "PlannedBatch",
    "RecordFile",
    "RecordIndex",
    "SFTDataConfig",
    "SFTLoader",
    "SkipCounter",
    "SyntheticSpec",
    "build_index",
    "collate",
    "encode_record",
    "make_sft_loader",
    "measure_record",
    "padding_waste",
    "read_records",
    "to_chat",
    "write_synthetic_sft",
]
