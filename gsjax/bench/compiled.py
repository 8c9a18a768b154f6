"""Compile the real `Learner` step on abstract (shape-only) state and batch, and read XLA's memory analysis.

Used by the layout benchmark and by the estimator's calibration test: nothing is allocated, so a config
compiles in seconds whatever its size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.parallel.mesh import MeshConfig, build_mesh
from gsjax.parallel.sharding import DEFAULT_RULES, Rules, batch_sharding
from gsjax.train.learner import Learner
from gsjax.train.model_loss import make_sft_loss
from gsjax.train.state import OptimizerSettings, ShardedSetup, init_state, make_optimizer, state_shardings

from .estimate import xla_peak_bytes


def make_learner(config: Qwen3VLConfig, mesh: MeshConfig, freeze: Sequence[str] = ("visual",),
                 optim: OptimizerSettings = OptimizerSettings(), rules: Rules = DEFAULT_RULES,
                 devices: Sequence[jax.Device] | None = None, logits_chunk: int = 0) -> Learner:
    """A Learner (SFT loss, LM head in `logits_chunk` blocks when > 0) on a mesh over `devices` (default: all)."""
    optimizer = make_optimizer(optim)
    setup = state_shardings(config, tuple(freeze), optimizer, build_mesh(mesh, devices), rules)
    return Learner(setup, optimizer, make_sft_loss(logits_chunk))


def abstract_state(config: Qwen3VLConfig, learner: Learner, freeze: Sequence[str]) -> Any:
    """The train state as ShapeDtypeStructs carrying their shardings."""
    setup: ShardedSetup = learner.setup
    shapes = jax.eval_shape(lambda: init_state(config, tuple(freeze), learner.optimizer, setup, seed=0))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        setup.state_shardings)


def abstract_batch(learner: Learner, batch: int, seq: int) -> dict[str, Any]:
    """A text-only batch as ShapeDtypeStructs laid out like `Learner.shard_batch` places them."""
    mesh, rules = learner.setup.mesh, learner.setup.rules

    def spec(shape: tuple[int, ...], dtype: Any, batch_dim: int = 0) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape), rules, batch_dim))

    return {"input_ids": spec((batch, seq), jnp.int32), "attention_mask": spec((batch, seq), jnp.bool_),
            "targets": spec((batch, seq), jnp.int32), "target_mask": spec((batch, seq), jnp.float32),
            "positions": spec((3, batch, seq), jnp.int32, batch_dim=1), "vision": None}


def compile_step(config: Qwen3VLConfig, learner: Learner, batch: int, seq: int,
                 freeze: Sequence[str] = ("visual",)) -> jax.stages.Compiled:
    """The learner's jitted step compiled for these shapes (the same executable `learner.step` runs)."""
    return learner._step.lower(abstract_state(config, learner, freeze), abstract_batch(learner, batch, seq)).compile()


def compiled_peak_bytes(compiled: jax.stages.Compiled) -> int | None:
    """`xla_peak_bytes` of a compiled step, or None where the backend gives no memory analysis."""
    stats = compiled.memory_analysis()
    return None if stats is None else xla_peak_bytes(stats)


def random_batch(config: Qwen3VLConfig, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """A host batch of random text tokens, every position a target (the benchmark's synthetic data)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(config.text.vocab_size, config.image_token_id), size=(batch, seq), dtype=np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), bool), "targets": targets,
            "target_mask": np.ones((batch, seq), np.float32),
            "positions": np.ascontiguousarray(np.broadcast_to(np.arange(seq, dtype=np.int32), (3, batch, seq))),
            "vision": None}
