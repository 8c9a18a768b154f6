"""Train state as a plain pytree (trainable params, frozen params, optimizer state, step, RNG), the
optimizer, and sharded initialisation / HF loading straight onto the mesh.

Frozen parameters (e.g. the vision tower) are split off before differentiation: they get no gradient
and no optimizer state, which is what makes freezing cheap rather than cosmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.models.qwen3_vl.model import Qwen3VL
from gsjax.parallel.sharding import DEFAULT_RULES, Rules, param_shardings

TrainState = dict[str, Any]  # {"params", "frozen", "opt_state", "step", "rng"}


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float = 1e-5
    weight_decay: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | constant | linear
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


def lr_schedule(s: OptimizerSettings) -> optax.Schedule:
    decay_steps = max(s.total_steps - s.warmup_steps, 1)
    if s.schedule == "cosine":
        decay = optax.cosine_decay_schedule(s.lr, decay_steps, alpha=s.min_lr_ratio)
    elif s.schedule == "linear":
        decay = optax.linear_schedule(s.lr, s.lr * s.min_lr_ratio, decay_steps)
    elif s.schedule == "constant":
        decay = optax.constant_schedule(s.lr)
    else:
        raise ValueError(f"optim.schedule={s.schedule!r} is not cosine, linear or constant")
    if s.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, s.lr, s.warmup_steps)
    return optax.join_schedules([warmup, decay], [s.warmup_steps])


def make_optimizer(s: OptimizerSettings) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; no decay on vectors (norm scales, biases), like HF Trainer."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(s.grad_clip) if s.grad_clip > 0 else optax.identity(),
        optax.adamw(lr_schedule(s), b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay, mask=decay_mask),
    )


def trainable_filter(freeze: Sequence[str]) -> Callable:
    """nnx filter: a Param whose dotted path starts with none of the frozen prefixes."""
    prefixes = tuple(freeze)

    def keep(path, value) -> bool:
        dotted = ".".join(str(p) for p in path)
        return isinstance(value, nnx.Param) and not any(
            dotted == f or dotted.startswith(f + ".") for f in prefixes)

    return keep


def split_model(model: Qwen3VL, freeze: Sequence[str]) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, frozen params); merge(graphdef, trainable, frozen) rebuilds the model."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(freeze), nnx.Param)
    return graphdef, trainable, frozen


@dataclass
class ShardedSetup:
    mesh: Mesh
    rules: Rules
    graphdef: nnx.GraphDef
    state_shardings: TrainState


def _abstract_split(config: Qwen3VLConfig, freeze: Sequence[str]):
    abstract = nnx.eval_shape(lambda: Qwen3VL(config, rngs=nnx.Rngs(0)))
    return split_model(abstract, freeze)


def state_shardings(config: Qwen3VLConfig, freeze: Sequence[str], optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules: Rules = DEFAULT_RULES) -> ShardedSetup:
    """Shardings for every leaf of the train state; optimizer moments follow their parameter."""
    graphdef, trainable, frozen = _abstract_split(config, freeze)
    p_shard = param_shardings(trainable, mesh, rules)
    f_shard = param_shardings(frozen, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, trainable)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, p_shard,
                                      transform_non_params=lambda _: replicated)
    shardings = {"params": p_shard, "frozen": f_shard, "opt_state": opt_shard, "step": replicated,
                 "rng": replicated}
    return ShardedSetup(mesh, rules, graphdef, shardings)


def init_state(config: Qwen3VLConfig, freeze: Sequence[str], optimizer: optax.GradientTransformation,
               setup: ShardedSetup, seed: int) -> TrainState:
    """Random init computed directly in its sharded layout (no host ever holds the full model)."""

    def build(key):
        model = Qwen3VL(config, rngs=nnx.Rngs(params=key))
        _, trainable, frozen = split_model(model, freeze)
        return {"params": trainable, "frozen": frozen, "opt_state": optimizer.init(trainable),
                "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed + 1))}

    return jax.jit(build, out_shardings=setup.state_shardings)(jax.random.key(seed))


def state_from_model(model: Qwen3VL, freeze: Sequence[str], optimizer: optax.GradientTransformation,
                     setup: ShardedSetup, seed: int) -> TrainState:
    """Train state around an existing (e.g. HF-loaded, already sharded) model."""
    _, trainable, frozen = split_model(model, freeze)
    trainable = jax.device_put(trainable, setup.state_shardings["params"])
    frozen = jax.device_put(frozen, setup.state_shardings["frozen"])
    opt_state = jax.jit(optimizer.init, out_shardings=setup.state_shardings["opt_state"])(trainable)
    return {"params": trainable, "frozen": frozen, "opt_state": opt_state,
            "step": jax.device_put(jnp.zeros((), jnp.int32), setup.state_shardings["step"]),
            "rng": jax.device_put(jax.random.key_data(jax.random.key(seed + 1)), setup.state_shardings["rng"])}


def sharded_place(setup: ShardedSetup, freeze: Sequence[str]) -> Callable[[str, np.ndarray, jnp.dtype], jax.Array]:
    """A `place` callback for `load_hf`: each device reads only its slice of the memory-mapped tensor."""
    by_path: dict[str, NamedSharding] = {}
    for group in ("params", "frozen"):
        for path, var in nnx.to_flat_state(setup.state_shardings[group]):
            by_path[".".join(str(p) for p in path)] = var.get_value()

    def place(path: str, array: np.ndarray, dtype: jnp.dtype) -> jax.Array:
        sharding = by_path[path]
        return jax.make_array_from_callback(array.shape, sharding,
                                            lambda index: np.asarray(array[index]).astype(dtype))

    return place
