"""Weight sync into a loopback fake SGLang: atomic versioned directories, pause -> flush (retried) -> update ->
verify -> continue in order, rollback to the last good directory, pruning to N, and a real bf16 HF export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gsjax.rollout.engine import EngineError
from gsjax.rollout.sglang import RetryPolicy, SGLangClient, SGLangEngine
from gsjax.rollout.weight_sync import MARKER, VersionedDirs, WeightSyncConfig, WeightSyncer, WeightSyncError
from tests.rollout.fake_sglang import FakeSGLang, serving
from tests.rollout.fakes import write_hf_dir

FAST = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.02, request_timeout_s=5.0, connect_timeout_s=2)
SYNC = WeightSyncConfig(keep=2, flush_attempts=4, flush_delay_s=0.001)
SYNC_NAMES = ["pause_generation", "flush_cache", "update_weights_from_disk", "get_weight_version",
              "continue_generation"]


@pytest.fixture
def fake(tmp_path):
    base = write_hf_dir(tmp_path / "base")
    state = FakeSGLang(model_path=str(base), weight_version="v0")
    with serving(state) as url:
        client = SGLangClient(url, FAST)
        yield state, client, base
        client.close()


def syncer_for(client: SGLangClient, root: Path, base: Path, sleeps: list[float] | None = None) -> WeightSyncer:
    record = sleeps if sleeps is not None else []
    return WeightSyncer(client, VersionedDirs(root, keep=SYNC.keep), SYNC, last_good=("v0", base),
                        sleep=record.append)


def test_sync_runs_the_protocol_in_order_and_verifies_the_version(fake, tmp_path):
    state, client, base = fake
    sleeps: list[float] = []
    syncer = syncer_for(client, tmp_path / "weights", base, sleeps)
    state.calls.clear()
    state.fault("/flush_cache", "busy", "busy")  # requests still running twice: flush is retried
    path = syncer.publish("v1", lambda d: write_hf_dir(d, 2.0))
    assert state.names() == ["pause_generation", "flush_cache", "flush_cache", "flush_cache",
                             "update_weights_from_disk", "get_weight_version", "continue_generation"]
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0]  # backoff between flush attempts
    assert state.calls[0][1] == {"mode": "abort"}
    update = dict(state.calls)["update_weights_from_disk"]
    assert update == {"model_path": str(path), "weight_version": "v1"}
    assert state.weight_version == "v1" and state.loads == [str(path)]
    assert syncer.last_good == ("v1", path) and json.loads((path / MARKER).read_text())["version"] == "v1"
    assert not state.paused


def test_failed_load_rolls_back_to_the_last_good_directory(fake, tmp_path):
    state, client, base = fake
    syncer = syncer_for(client, tmp_path / "weights", base)
    good = syncer.publish("v1", lambda d: write_hf_dir(d, 1.0))
    state.calls.clear()

    def corrupt(d: Path) -> None:  # a writer that produced a truncated safetensors file
        write_hf_dir(d, 3.0)
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])

    with pytest.raises(WeightSyncError) as info:
        syncer.publish("v2", corrupt)
    assert info.value.rolled_back_to == "v1" and "rolled back" in str(info.value)
    assert state.names() == ["pause_generation", "flush_cache", "update_weights_from_disk",
                             "update_weights_from_disk", "get_weight_version", "continue_generation"]
    assert dict(state.calls[3:4])["update_weights_from_disk"] == {"model_path": str(good), "weight_version": "v1"}
    assert state.weight_version == "v1" and state.model_path == str(good) and syncer.last_good == ("v1", good)
    assert not state.paused


def test_a_server_that_keeps_the_old_version_fails_verification(fake, tmp_path):
    state, client, base = fake
    syncer = syncer_for(client, tmp_path / "weights", base)
    state.fault("/update_weights_from_disk", "stale")
    with pytest.raises(WeightSyncError, match="reports weight version 'v0', expected 'v1'"):
        syncer.publish("v1", lambda d: write_hf_dir(d))
    assert state.loads[-1] == str(base.resolve()) and syncer.last_good == ("v0", base)  # reloaded the base


def test_rollback_failure_and_flush_exhaustion_are_reported(fake, tmp_path):
    state, client, base = fake
    syncer = syncer_for(client, tmp_path / "weights", base)
    state.fault("/update_weights_from_disk", "fail", "fail")
    with pytest.raises(WeightSyncError, match="rollback FAILED") as info:
        syncer.publish("v1", lambda d: write_hf_dir(d))
    assert info.value.rolled_back_to is None and not state.paused
    state.calls.clear()
    state.fault("/flush_cache", *["busy"] * SYNC.flush_attempts)
    with pytest.raises(WeightSyncError, match="flush_cache still refused"):
        syncer.publish("v2", lambda d: write_hf_dir(d))
    assert "update_weights_from_disk" not in state.names() and state.names()[-1] == "continue_generation"


def test_directories_are_atomic_and_pruned_to_n(tmp_path):
    dirs = VersionedDirs(tmp_path / "w", keep=2)
    seen_during_write: list[list[str]] = []

    def slow_writer(d: Path) -> None:
        write_hf_dir(d)
        seen_during_write.append([x.version for x in dirs.dirs()])

    def failing_writer(d: Path) -> None:
        write_hf_dir(d)
        raise OSError("disk full")

    first = dirs.write("step/1", slow_writer)
    assert seen_during_write == [[]]  # the directory being written is never listed
    with pytest.raises(OSError, match="disk full"):
        dirs.write("step-2", failing_writer)
    assert [d.version for d in dirs.dirs()] == ["step/1"]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [first.path.name]  # no partial dir left
    assert first.path.name.startswith("000001-step_1-")  # unsafe characters replaced, name kept unique
    for v in ("a", "b", "c"):
        dirs.write(v, write_hf_dir)
    removed = dirs.prune(protect=[first.path])
    assert [d.version for d in dirs.dirs()] == ["step/1", "b", "c"] and len(removed) == 1
    (tmp_path / "w" / ".staging-crashed").mkdir()
    (tmp_path / "w" / "not-ours").mkdir()
    reopened = VersionedDirs(tmp_path / "w", keep=2)
    assert not (tmp_path / "w" / ".staging-crashed").exists()  # a crashed writer's staging is cleaned
    assert [d.version for d in reopened.dirs()] == ["step/1", "b", "c"]  # unmarked folders are ignored


def test_engine_sync_keeps_n_directories_and_exports_a_real_model_in_bf16(fake, tmp_path, tiny_qwen3vl):
    state, _, base = fake
    engine = SGLangEngine(state_url(fake), retry=FAST, weights_root=tmp_path / "weights", sync=SYNC,
                          initial_model_path=str(base))
    assert engine.weight_version == "v0" and engine.syncer.last_good == ("v0", base)
    for step in range(1, 4):
        engine.update_weights(tiny_qwen3vl, f"step-{step}")
        assert engine.weight_version == f"step-{step}" == state.weight_version
    kept = VersionedDirs(tmp_path / "weights").dirs()
    assert [d.version for d in kept] == ["step-2", "step-3"]
    assert state.model_path == str(kept[-1].path)
    header_len = int.from_bytes((kept[-1].path / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((kept[-1].path / "model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert (kept[-1].path / "config.json").is_file()
    with pytest.raises(EngineError, match="cannot export"):
        engine.update_weights({"not": "a model"}, "step-4")
    engine.close()


def state_url(fake_fixture: tuple) -> str:
    return fake_fixture[1].base_url


@pytest.fixture(scope="module")
def tiny_qwen3vl(tmp_path_factory):
    from gsjax.models.qwen3_vl import reference
    from gsjax.models.qwen3_vl.checkpoint import load_hf

    return load_hf(reference.build_tiny_hf(tmp_path_factory.mktemp("tiny") / "hf", seed=1))
