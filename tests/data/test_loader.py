"""The SFT loader end to end: coverage over epochs, seeded order, host shards, resume, bad records."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gsjax.data import BadRecordError, SFTDataConfig, make_sft_loader, read_records
from gsjax.data.skips import SKIP_KINDS
from gsjax.models.qwen3_vl.config import Qwen3VLConfig

BUCKETS = (128, 256, 512)


def _cfg(path: Path, **overrides: Any) -> SFTDataConfig:
    base = SFTDataConfig(path=str(path), batch_size=3, buckets=BUCKETS, cutoff_len=1024, num_epochs=2, seed=11)
    return replace(base, **overrides)


def _all(loader: Any) -> list[dict[str, Any]]:
    with loader:
        return list(loader)


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("input_ids", "attention_mask", "targets", "target_mask", "positions"):
        np.testing.assert_array_equal(a[key], b[key])
    assert (a["vision"] is None) == (b["vision"] is None)
    for key in a["vision"] or {}:
        np.testing.assert_array_equal(a["vision"][key], b["vision"][key])
    assert a["stats"] == b["stats"] and a["num_tokens"] == b["num_tokens"]


def test_epochs_cover_every_record_with_few_shapes(sft_path: Path, qwen_tokenizer: Any,
                                                    tiny_model_cfg: Qwen3VLConfig) -> None:
    loader = make_sft_loader(_cfg(sft_path), qwen_tokenizer, tiny_model_cfg)
    batches = _all(loader)
    assert len(batches) == loader.num_steps == 2 * loader.steps_per_epoch
    seen = Counter(r for b in batches for r in b["stats"]["records"] if r >= 0)
    assert seen == Counter({i: 2 for i in range(len(read_records(sft_path)))})
    assert [b["stats"]["epoch"] for b in batches] == sorted(b["stats"]["epoch"] for b in batches)
    shapes = {(b["input_ids"].shape, None if b["vision"] is None else b["vision"]["pixel_values"].shape)
              for b in batches}
    assert {s[0][1] for s in shapes} <= {*BUCKETS, 1024} and all(s[0][0] == 3 for s in shapes)
    assert len(shapes) <= 8
    assert any(b["vision"] is not None for b in batches) and any(b["vision"] is None for b in batches)
    for b in batches:
        assert b["num_tokens"] == int(b["target_mask"].sum()) > 0
    assert loader.stats["skipped"] == 0


def test_configured_loss_position_buckets_fix_the_head_size(sft_path: Path, qwen_tokenizer: Any,
                                                           tiny_model_cfg: Qwen3VLConfig) -> None:
    """data.loss_position_buckets replaces the automatic 64, 96, 128, ... ladder: one head size, fewer programs."""
    auto = {b["loss_positions"].shape[1] for b in _all(make_sft_loader(_cfg(sft_path), qwen_tokenizer,
                                                                        tiny_model_cfg))
            if b["loss_positions"] is not None}
    assert len(auto) > 1
    fixed = _all(make_sft_loader(_cfg(sft_path, loss_position_buckets=[300]), qwen_tokenizer, tiny_model_cfg))
    heads = {b["loss_positions"].shape[1] for b in fixed if b["loss_positions"] is not None}
    assert heads == {300}  # (the head runs at full length where that is not longer)
    for batch in fixed:
        if batch["loss_positions"] is None:
            continue
        trained = batch["target_mask"] > 0
        for row, positions in zip(trained, batch["loss_positions"]):
            assert positions[: row.sum()].tolist() == np.flatnonzero(row).tolist()


def test_order_is_seeded(sft_path: Path, qwen_tokenizer: Any, tiny_model_cfg: Qwen3VLConfig) -> None:
    def order(seed: int) -> list[list[int]]:
        loader = make_sft_loader(_cfg(sft_path, seed=seed, num_epochs=1), qwen_tokenizer, tiny_model_cfg)
        return [b["stats"]["records"] for b in _all(loader)]

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_host_shards_are_disjoint_and_cover(sft_path: Path, qwen_tokenizer: Any,
                                           tiny_model_cfg: Qwen3VLConfig) -> None:
    cfg = _cfg(sft_path, batch_size=2, num_epochs=1)
    hosts = [_all(make_sft_loader(cfg, qwen_tokenizer, tiny_model_cfg, process_index=p, process_count=3))
             for p in range(3)]
    assert len({len(h) for h in hosts}) == 1
    ids = [r for h in hosts for b in h for r in b["stats"]["records"] if r >= 0]
    assert sorted(ids) == list(range(len(read_records(sft_path))))
    for step in zip(*hosts):
        assert len({b["input_ids"].shape for b in step}) == 1
        vision = {None if b["vision"] is None else b["vision"]["pixel_values"].shape for b in step}
        assert len(vision) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_exact_next_batch(sft_path: Path, qwen_tokenizer: Any,
                                                    tiny_model_cfg: Qwen3VLConfig, workers: int) -> None:
    reference = _all(make_sft_loader(_cfg(sft_path), qwen_tokenizer, tiny_model_cfg))
    cut = len(reference) // 2 + 1  # inside the second epoch
    cfg = _cfg(sft_path, worker_count=workers, index_worker_count=0)
    with make_sft_loader(cfg, qwen_tokenizer, tiny_model_cfg) as first:
        head = [next(first) for _ in range(cut)]
        state = json.loads(json.dumps(first.get_state()))
    resumed = make_sft_loader(cfg, qwen_tokenizer, tiny_model_cfg)
    resumed.set_state(state)
    tail = _all(resumed)
    assert len(head) + len(tail) == len(reference)
    for got, want in zip(head + tail, reference):
        _assert_same(got, want)


def test_state_of_another_plan_is_refused(sft_path: Path, qwen_tokenizer: Any,
                                          tiny_model_cfg: Qwen3VLConfig) -> None:
    state = make_sft_loader(_cfg(sft_path), qwen_tokenizer, tiny_model_cfg).get_state()
    other = make_sft_loader(_cfg(sft_path, seed=12), qwen_tokenizer, tiny_model_cfg)
    with pytest.raises(ValueError, match="different plan"):
        other.set_state(state)


def _messages(*texts: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"] * len(texts)
    return [{"role": r, "content": t} for r, t in zip(roles, texts)]


BAD_RECORDS = {
    "bad_format": ["not an object"],
    "bad_turns": {"messages": _messages("q", "a") + [{"role": "user", "content": "dangling"}]},
    "image_count": {"messages": _messages("<image><image>q", "a"), "images": ["imgs/ok.png"]},
    "image_placement": {"messages": _messages("q", "<image>a"), "images": ["imgs/ok.png"]},
    "missing_image": {"messages": _messages("<image>q", "a"), "images": ["imgs/nowhere.png"]},
    "bad_image": {"messages": _messages("<image>q", "a"), "images": ["imgs/junk.png"]},
    "too_long": {"messages": _messages("word " * 1200, "a")},
    "encode_error": {"messages": _messages("a literal <|image_pad|> token", "a")},
}


def _dataset_with(tmp_path: Path, sft_path: Path, bad: list[Any]) -> Path:
    """The synthetic records with `bad` ones inserted at positions 1, 3, 5, ..., plus the helper images."""
    root = tmp_path / "data"
    shutil.copytree(sft_path.parent, root)
    Image.fromarray(np.full((50, 50, 3), 200, np.uint8)).save(root / "imgs" / "ok.png")
    (root / "imgs" / "junk.png").write_bytes(b"definitely not a png")
    truncated = root / "imgs" / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-200])
    records = read_records(sft_path)
    for k, record in enumerate(bad):
        records.insert(2 * k + 1, record)
    path = root / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def test_bad_records_are_skipped_and_counted(tmp_path: Path, sft_path: Path, qwen_tokenizer: Any,
                                             tiny_model_cfg: Qwen3VLConfig) -> None:
    assert set(BAD_RECORDS) == set(SKIP_KINDS)
    runtime_bad = {"messages": _messages("<image>q", "a"), "images": ["imgs/cut.png"]}
    path = _dataset_with(tmp_path, sft_path, [*BAD_RECORDS.values(), runtime_bad])
    loader = make_sft_loader(_cfg(path), qwen_tokenizer, tiny_model_cfg)
    assert loader.stats["index_skips"] == {kind: 1 for kind in SKIP_KINDS}
    in_worker = make_sft_loader(_cfg(path, index_worker_count=1), qwen_tokenizer, tiny_model_cfg)
    assert in_worker.stats == loader.stats and in_worker.plan.fingerprint() == loader.plan.fingerprint()
    batches = _all(loader)
    assert sum(b["stats"]["skipped"].get("bad_image", 0) for b in batches) == 2  # once per epoch
    assert loader.stats["runtime_skips"] == {"bad_image": 2}
    assert loader.stats["skipped"] == len(SKIP_KINDS) + 2
    trained = Counter(r for b in batches for r in b["stats"]["records"] if r >= 0)
    assert len(trained) == len(read_records(sft_path)) and set(trained.values()) == {2}


@pytest.mark.parametrize("kind", SKIP_KINDS)
def test_bad_records_raise_naming_the_record(kind: str, tmp_path: Path, sft_path: Path, qwen_tokenizer: Any,
                                             tiny_model_cfg: Qwen3VLConfig) -> None:
    path = _dataset_with(tmp_path, sft_path, [BAD_RECORDS[kind]])
    with pytest.raises(BadRecordError, match=f"record 1 of .*mixed.json: {kind}") as err:
        make_sft_loader(_cfg(path, on_bad_record="error"), qwen_tokenizer, tiny_model_cfg)
    assert err.value.kind == kind
    copy = pickle.loads(pickle.dumps(err.value))  # errors raised in grain workers cross a process boundary
    assert (str(copy), copy.kind) == (str(err.value), kind)


def test_decode_failure_during_training_raises_under_error(tmp_path: Path, sft_path: Path, qwen_tokenizer: Any,
                                                           tiny_model_cfg: Qwen3VLConfig) -> None:
    runtime_bad = {"id": "cut", "messages": _messages("<image>q", "a"), "images": ["imgs/cut.png"]}
    path = _dataset_with(tmp_path, sft_path, [runtime_bad])
    loader = make_sft_loader(_cfg(path, on_bad_record="error"), qwen_tokenizer, tiny_model_cfg)
    with pytest.raises(BadRecordError, match=r"record 1 \(id='cut'\).*bad_image"):
        _all(loader)
