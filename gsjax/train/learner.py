"""The jitted, sharded learner step: gradients of a (sum, denominator) loss, accumulation, optimizer update.

`step(state, batch)` is one pure function under `jax.jit` with explicit in/out shardings and a donated
state. With gradient accumulation, `grad(state, micro_batch)` runs per micro-batch (each may have its own
length bucket) and `apply(state, grad_sum, denominator)` finishes the update; the result equals one big
batch because gradients of loss *sums* are added and divided once by the total denominator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from gsjax.models.qwen3_vl.vision import VisionInputs
from gsjax.parallel.multihost import global_batch_array, global_vision, place_vision, process_order
from gsjax.parallel.sharding import Rules, batch_parts, batch_sharding, logical_sharding

from .model_loss import Batch, LossFn, sft_loss
from .state import ShardedSetup, TrainState


def device_batch(batch: Batch) -> dict[str, Any]:
    """The array part of a host batch, with `vision` as VisionInputs (or None)."""
    keys = ("input_ids", "attention_mask", "targets", "target_mask", "positions")
    out: dict[str, Any] = {k: batch[k] for k in keys}
    if batch.get("loss_positions") is not None:
        out["loss_positions"] = batch["loss_positions"]
    vision = batch.get("vision")
    out["vision"] = None if vision is None else (vision if isinstance(vision, VisionInputs)
                                                 else VisionInputs(**vision))
    return out


def check_batch_size(global_batch: int, mesh: Mesh, rules: Rules) -> None:
    parts = batch_parts(mesh, rules)
    if global_batch % parts:
        raise ValueError(f"global batch {global_batch} is not divisible by the {parts} batch shards of mesh "
                         f"{dict(mesh.shape)}; use a batch size that is a multiple of {parts}")


def merge_stats(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Combine two micro-batches' loss statistics: sums add, `*_max` keys take the maximum."""
    return {k: jnp.maximum(a[k], b[k]) if k.endswith("_max") else a[k] + b[k] for k in a}


class Learner:
    def __init__(self, setup: ShardedSetup, optimizer: optax.GradientTransformation,
                 loss_fn: LossFn = sft_loss):
        self.setup = setup
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        shardings = setup.state_shardings
        self._grad = jax.jit(self._grad_fn, out_shardings=(shardings["params"], None, None, None))
        self._apply = jax.jit(self._apply_fn, out_shardings=(shardings, None), donate_argnums=(0,))
        self._step = jax.jit(self._step_fn, out_shardings=(shardings, None), donate_argnums=(0,))

    # ---------------------------------------------------------------- pure functions
    def _loss(self, params, frozen, batch):
        model = nnx.merge(self.setup.graphdef, params, frozen)
        with logical_sharding(self.setup.mesh, self.setup.rules):
            return self.loss_fn(model, batch)

    def _value_and_grad(self, state: TrainState, batch: Batch):
        """Grads of the loss sum; aux = (denominator, stats). A LossFn may return (sum, denom) or
        (sum, denom, stats) with additive statistics (keys ending in `_max` combine by maximum)."""

        def summed(params):
            out = self._loss(params, state["frozen"], batch)
            loss_sum, denom, stats = out if len(out) == 3 else (*out, {})
            return loss_sum, (denom, stats)

        return jax.value_and_grad(summed, has_aux=True)(state["params"])

    def _grad_fn(self, state: TrainState, batch: Batch):
        (loss_sum, (denom, stats)), grads = self._value_and_grad(state, batch)
        return grads, loss_sum, denom, stats

    def _apply_fn(self, state: TrainState, grad_sum, loss_sum, denom, stats):
        scale = 1.0 / jnp.maximum(denom, 1.0)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grad_sum)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {"loss": loss_sum * scale, "grad_norm": optax.tree.norm(grads), "tokens": denom}
        if stats:
            metrics["stats"] = stats
        return new_state, metrics

    def _step_fn(self, state: TrainState, batch: Batch):
        (loss_sum, (denom, stats)), grads = self._value_and_grad(state, batch)
        return self._apply_fn(state, grads, loss_sum, denom, stats)

    # ---------------------------------------------------------------- host API
    def shard_batch(self, batch: Batch) -> dict[str, Any]:
        """Place this host's batch on the mesh: token arrays split over the batch axes (each host's rows are
        its block of the global batch); vision rows (every host's images, in global row order) split over the
        same axes."""
        mesh, rules = self.setup.mesh, self.setup.rules
        batch = device_batch(batch)
        if jax.process_count() > 1:  # K is chosen per host: the full-length head keeps global shapes equal
            batch.pop("loss_positions", None)
        check_batch_size(batch["input_ids"].shape[0] * jax.process_count(), mesh, rules)
        out = {k: global_batch_array(v, batch_sharding(mesh, v.ndim, rules)) for k, v in batch.items()
               if k not in ("positions", "vision")}
        out["positions"] = global_batch_array(batch["positions"], batch_sharding(mesh, 3, rules, batch_dim=1))
        vision = batch["vision"]
        if vision is not None and jax.process_count() > 1:
            order = process_order(out["input_ids"].sharding, out["input_ids"].shape)
            vision = global_vision(vision, order)
        out["vision"] = None if vision is None else place_vision(vision, mesh, rules)
        return out

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        return self._step(state, self.shard_batch(batch))

    def accumulate(self, state: TrainState, micro_batches: Iterable[Batch]
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update from several micro-batches (equal to one step on their union)."""
        grad_sum = loss_sum = denom = stats = None
        for micro in micro_batches:
            grads, ls, d, st = self._grad(state, self.shard_batch(micro))
            if grad_sum is None:
                grad_sum, loss_sum, denom, stats = grads, ls, d, st
            else:
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                loss_sum, denom, stats = loss_sum + ls, denom + d, merge_stats(stats, st)
        if grad_sum is None:
            raise ValueError("accumulate() got no micro-batches")
        return self._apply(state, grad_sum, loss_sum, denom, stats)
