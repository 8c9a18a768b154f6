"""Orbax checkpoints of the sharded train state: bit-exact round trip into requested shardings,
keep-N, partial writes ignored, async saves safe against donation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gsjax.models.qwen3_vl.config import preset
from gsjax.parallel.mesh import MeshConfig, build_mesh
from gsjax.train.checkpointing import (
    Checkpointer,
    CheckpointMismatch,
    abstract_state,
    abstract_train_state,
    complete_steps,
    from_nested,
    restore_latest,
    to_nested,
)
from gsjax.train.state import (
    OptimizerSettings,
    init_state,
    make_optimizer,
    state_shardings,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
FREEZE = ("visual",)
CONFIG = {"train": {"steps": 10}, "note": "saved with every step"}


@pytest.fixture(scope="module")
def tiny():
    """The tiny model (vocab cut to 256 to keep files small) on an fsdp=4 × tensor=2 mesh."""
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=256), image_token_id=200,
                              video_token_id=201, vision_start_token_id=202, vision_end_token_id=203)
    optimizer = make_optimizer(OptimizerSettings(total_steps=10))
    setup = state_shardings(cfg, FREEZE, optimizer, build_mesh(MeshConfig(fsdp=4, tensor=2)))
    state = init_state(cfg, FREEZE, optimizer, setup, seed=0)

    def distinct(tree):  # a different offset per leaf: zero moments would hide a mix-up between leaves
        leaves, treedef = jax.tree.flatten(tree)
        return treedef.unflatten([x + (i + 1) * 0.25 if x.dtype == jnp.float32 else x + 3
                                  for i, x in enumerate(leaves)])

    state = jax.jit(distinct, out_shardings=setup.state_shardings)(state)
    return cfg, optimizer, setup, state


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _assert_same(restored, expected_host):
    assert jax.tree.structure(restored) == jax.tree.structure(expected_host)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected_host)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)


def _shardings(tree):
    return [x.sharding for x in jax.tree.leaves(tree)]


def _small_state(value: float = 1.0):
    """A quick sharded state (an nnx.State and a counter) for the tests about files, not models."""
    mesh = build_mesh(MeshConfig(fsdp=8))
    w = jax.device_put(jnp.full((8, 4), value), NamedSharding(mesh, PartitionSpec("fsdp")))
    return {"params": nnx.State({"w": nnx.Param(w)}), "step": jax.device_put(jnp.int32(value))}


def test_save_restore_is_bit_exact_into_requested_shardings(tiny, tmp_path: Path):
    cfg, optimizer, setup, state = tiny
    expected = _host(state)
    with Checkpointer(tmp_path, keep=3, every=1, config=CONFIG) as ckpt:
        assert ckpt.save(3, state, {"epoch": 0, "position": 17, "order": [3, 1, 2]})
        ckpt.wait()
        assert ckpt.latest_step() == 3
        restored = ckpt.restore(abstract_train_state(cfg, FREEZE, optimizer, setup))
    assert restored is not None and restored.step == 3
    assert restored.data_state == {"epoch": 0, "position": 17, "order": [3, 1, 2]}
    assert restored.config == CONFIG
    assert isinstance(restored.state["params"], nnx.State) and isinstance(restored.state["frozen"], nnx.State)
    _assert_same(restored.state, expected)
    assert _shardings(restored.state) == jax.tree.leaves(setup.state_shardings)
    # the layout really is split: a tensor-parallel kernel holds a quarter × half on each device
    q = restored.state["params"]["layers"][0]["self_attn"]["q_proj"].get_value()
    assert q.addressable_shards[0].data.shape == (q.shape[0] // 4, q.shape[1] // 2, q.shape[2])


def test_restore_reshards_onto_another_mesh(tiny, tmp_path: Path):
    cfg, optimizer, _, state = tiny
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(3, state)
    other = state_shardings(cfg, FREEZE, optimizer, build_mesh(MeshConfig(fsdp=8)))
    got = restore_latest(tmp_path, abstract_train_state(cfg, FREEZE, optimizer, other))
    assert got is not None
    restored, data_state, step = got
    assert (data_state, step) == ({}, 3)
    _assert_same(restored, _host(state))
    assert _shardings(restored) == jax.tree.leaves(other.state_shardings)


def test_async_save_survives_donation_of_the_state(tmp_path: Path):
    state = _small_state(2.0)
    expected = _host(state)
    ckpt = Checkpointer(tmp_path, every=1, async_save=True)
    assert ckpt.save(1, state, {"position": 1})
    for leaf in jax.tree.leaves(state):  # what donating the state to the next step does
        leaf.delete()
    ckpt.wait()
    ckpt.close()
    restored, data_state, step = restore_latest(tmp_path, abstract_state(_small_state()))
    _assert_same(restored, expected)
    assert (data_state, step) == ({"position": 1}, 1)


def test_keep_n_and_save_interval(tmp_path: Path):
    with Checkpointer(tmp_path, keep=2, every=2) as ckpt:
        saved = [ckpt.save(step, _small_state(step), {"position": step}) for step in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert ckpt.save(7, _small_state(7), {"position": 7}, force=True)  # the final step, off the interval
        assert not ckpt.save(7, _small_state(7), force=True)  # already there: no error, no rewrite
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
    restored, data_state, step = restore_latest(tmp_path, abstract_state(_small_state()))
    assert step == 7 and data_state == {"position": 7}
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"].get_value()), np.full((8, 4), 7.0))


def test_partial_checkpoints_are_never_latest(tmp_path: Path):
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(5, _small_state(5), {"position": 5})
    # a write killed before its commit (orbax's temporary name) and a step directory without the
    # metadata orbax writes before committing (e.g. a half-finished copy)
    torn = tmp_path / "9.orbax-checkpoint-tmp-1712345678"
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "garbage").write_bytes(b"\x00" * 10)
    (tmp_path / "8" / "state").mkdir(parents=True)
    assert complete_steps(tmp_path) == [5]
    restored, data_state, step = restore_latest(tmp_path, abstract_state(_small_state()))
    assert step == 5 and data_state == {"position": 5}
    np.testing.assert_array_equal(np.asarray(restored["step"]), 5)
    assert torn.exists()  # reading never deletes anything
    with Checkpointer(tmp_path, every=1) as ckpt:  # a writer cleans up the killed write before saving
        ckpt.save(9, _small_state(9))
    assert not torn.exists()
    assert complete_steps(tmp_path) == [5, 9]


def test_nothing_to_restore(tmp_path: Path):
    missing = tmp_path / "none"
    assert restore_latest(missing, abstract_state(_small_state())) is None
    assert not missing.exists()
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None and ckpt.restore(abstract_state(_small_state())) is None


def test_restoring_into_a_different_state_is_an_error(tmp_path: Path):
    with Checkpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, _small_state())
    target = abstract_state(_small_state())
    target["params"]["extra"] = nnx.Param(jax.ShapeDtypeStruct((2,), jnp.float32))
    with pytest.raises(CheckpointMismatch, match="a new run needs a new train.out_dir.*params/extra: not in the ch"):
        restore_latest(tmp_path, target)
    resized = abstract_state(_small_state())
    resized["params"]["w"] = nnx.Param(jax.ShapeDtypeStruct((16, 4), jnp.float32,
                                                            sharding=resized["step"].sharding))
    with pytest.raises(CheckpointMismatch, match=r"params/w: shape \(8, 4\) in the checkpoint, \(16, 4\) in the"):
        restore_latest(tmp_path, resized)


def test_nested_names_follow_the_module_paths(tiny):
    _, _, _, state = tiny
    nested = to_nested(state)
    assert set(nested) == {"params", "frozen", "opt_state", "step", "rng"}
    assert nested["params"]["lm_head"].shape == (64, 256)  # a Variable's `.value` hop adds no level
    assert nested["params"]["layers"]["0"]["self_attn"]["q_proj"].shape == (64, 4, 24)
    assert nested["frozen"]["visual"]["patch_embed"]["kernel"].ndim == 2
    rebuilt = from_nested(state, nested)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(state)
    assert all(a is b for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(state)))
