"""The benchmarks' shared checkpoint builder: the $GSJAX_BENCH_CACHE reuse keyed by the whole build spec, and
the vision-id scrub that keeps fed-back model outputs text-only."""

from __future__ import annotations

import json

import pytest

from gsjax import benchmarking as B
from gsjax.models.qwen3_vl.config import Qwen3VLConfig

SMALL = {"vocab_size": 4096, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
         "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                             "mrope_interleaved": True}}


@pytest.fixture
def small_workload(monkeypatch):
    monkeypatch.setitem(B.WORKLOADS, "test-small", dict(SMALL))
    return "test-small"


def test_cache_reuses_a_build_and_rebuilds_when_the_workload_changes(tmp_path, monkeypatch, small_workload):
    monkeypatch.setenv(B.CACHE_ENV, str(tmp_path / "cache"))
    first = B.build_checkpoint(small_workload, tmp_path / "unused", "float32")
    assert first.parent == tmp_path / "cache" and (first / "config.json").is_file()
    assert not (tmp_path / "unused").exists()
    stamp = (first / "config.json").stat().st_mtime_ns
    assert B.build_checkpoint(small_workload, tmp_path / "unused", "float32") == first
    assert (first / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt

    B.WORKLOADS[small_workload]["num_hidden_layers"] = 2  # same name, another model: never the stale one
    second = B.build_checkpoint(small_workload, tmp_path / "unused", "float32")
    assert second != first
    assert json.loads((second / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_checkpoint_vision_ids_lie_outside_the_prompt_ids(tmp_path, small_workload):
    config = Qwen3VLConfig.from_file(B.build_checkpoint(small_workload, tmp_path / "ckpt"))
    assert min(config.image_token_id, config.video_token_id, config.vision_start_token_id,
               config.vision_end_token_id) >= B.PROMPT_VOCAB
    assert B.random_token_ids(config, 2, 64).max() < B.PROMPT_VOCAB
    qwen = B.checkpoint_spec("8b-8layers", "bfloat16")["ids"]  # the agent's prompts carry Qwen's own ids
    assert qwen == B.QWEN_VISION_IDS and qwen["image_token_id"] == 151655


def test_text_only_replaces_vision_placeholders(tmp_path, small_workload):
    config = Qwen3VLConfig.from_file(B.build_checkpoint(small_workload, tmp_path / "ckpt"))
    ids = [5, config.image_token_id, 7, config.video_token_id, config.vision_end_token_id]
    assert B.text_only(config, ids) == [5, 0, 7, 0, 0]
