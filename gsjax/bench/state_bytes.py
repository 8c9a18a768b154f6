"""Per-device bytes of the train state (trainable params, frozen params, optimizer state) for any model
size and mesh, without allocating anything.

The layout is the real one: parameters come from an abstract model (`nnx.eval_shape`) and are placed by
`param_shardings` with the run's rules on an `AbstractMesh`, so replicated small tensors and the rules'
choices are counted as they will be. To stay instant for 8B/30B models, the abstract model is built with
one decoder layer per layer kind (dense / MoE) and as few vision blocks as DeepStack allows; layers of a
kind are identical, so each stands for all of its kind (a multiplicity per parameter path).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import optax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from gsjax.models.qwen3_vl.config import Qwen3VLConfig
from gsjax.models.qwen3_vl.model import Qwen3VL
from gsjax.parallel.mesh import MESH_AXES
from gsjax.parallel.sharding import DEFAULT_RULES, Rules, param_shardings
from gsjax.train.state import OptimizerSettings, make_optimizer, split_model

MeshSizes = tuple[tuple[str, int], ...]  # hashable {axis: size}
GATHER_AXES = ("data", "fsdp")  # axes FSDP gathers a weight over before using it


@dataclass(frozen=True)
class StateBytes:
    """Per-device bytes of each part of the train state, the global parameter counts, and the per-device
    bytes of one decoder layer's weights once FSDP has gathered them (per layer kind) and of the gathered
    LM head / embedding table, which the activation model needs."""

    trainable: int
    frozen: int
    optimizer: int
    trainable_count: int
    frozen_count: int
    gathered_layer: dict[str, int]  # "dense" / "moe" → bytes of one layer's weights, gathered
    gathered_vocab_table: int  # one (V/tensor, H) table, gathered


@dataclass(frozen=True)
class _Placement:
    """How one parameter of the reduced model is counted: its per-device shape and how many it stands for.

    Deliberately not a pytree, so optax's `tree_map_params` hands it over whole.
    """

    shard_shape: tuple[int, ...]
    multiplicity: float


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    """A device-free mesh with the project's axis names, for layout arithmetic."""
    shape = tuple(int(sizes.get(a, 1)) for a in MESH_AXES)
    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def reduced_config(config: Qwen3VLConfig) -> tuple[Qwen3VLConfig, dict[int, int], float]:
    """One decoder layer per kind and the fewest vision blocks; returns the config, the number of full
    layers each reduced layer index stands for, and the number of full vision blocks per reduced block."""
    t, v = config.text, config.vision
    kinds = [t.is_moe_layer(i) for i in range(t.num_hidden_layers)]
    present = sorted(set(kinds))  # False (dense) before True (MoE)
    dense_at = tuple(i for i, moe in enumerate(present) if not moe)
    text = dataclasses.replace(t, num_hidden_layers=len(present), decoder_sparse_step=1, mlp_only_layers=dense_at)
    layer_mult = {i: kinds.count(moe) for i, moe in enumerate(present)}
    taps = len(v.deepstack_visual_indexes)
    depth = max(taps, 1)
    vision = dataclasses.replace(v, depth=depth, deepstack_visual_indexes=tuple(range(taps)))
    reduced = dataclasses.replace(config, text=text, vision=vision).with_runtime(remat="none", vision_remat="none")
    return reduced, layer_mult, v.depth / depth


def _multiplicity(path: Sequence, layer_mult: dict[int, int], block_mult: float) -> float:
    keys = [str(p) for p in path]
    if len(keys) > 1 and keys[0] == "layers":
        return float(layer_mult.get(int(keys[1]), 1))
    if len(keys) > 2 and keys[0] == "visual" and keys[1] == "blocks":
        return block_mult
    return 1.0


def _placements(state: nnx.State, mesh: AbstractMesh, rules: Rules, layer_mult: dict[int, int],
                block_mult: float) -> nnx.State:
    by_path = {path: var.get_value() for path, var in nnx.to_flat_state(param_shardings(state, mesh, rules))}

    def one(path, var):
        shard_shape = tuple(by_path[path].shard_shape(var.shape))
        return var.replace(_Placement(shard_shape, _multiplicity(path, layer_mult, block_mult)))

    return nnx.map_state(one, state)


def _bytes(leaf: jax.ShapeDtypeStruct, place: _Placement) -> float:
    return math.prod(place.shard_shape) * leaf.dtype.itemsize * place.multiplicity


def _total(values: Sequence[float]) -> int:
    return int(round(sum(values)))


def _flat_bytes(state: nnx.State, places: nnx.State) -> dict[tuple, float]:
    """Path → per-device bytes of one instance (multiplicity not applied)."""
    place_by_path = {p: v.get_value() for p, v in nnx.to_flat_state(places)}
    return {p: math.prod(place_by_path[p].shard_shape) * v.dtype.itemsize
            for p, v in nnx.to_flat_state(state)}


def _gathered(model_params: nnx.State, mesh_sizes: dict[str, int], rules: Rules,
              layer_kinds: dict[int, str]) -> tuple[dict[str, int], int]:
    """Bytes per device of each layer kind's weights and of one vocab table after the FSDP gather."""
    kept = {a: s for a, s in mesh_sizes.items() if a not in GATHER_AXES}
    flat = _flat_bytes(model_params, _placements(model_params, abstract_mesh(kept), rules, {}, 1.0))
    per_kind: dict[str, int] = {}
    table = 0
    for path, size in flat.items():
        keys = [str(p) for p in path]
        if keys[0] == "layers":
            kind = layer_kinds[int(keys[1])]
            per_kind[kind] = per_kind.get(kind, 0) + int(size)
        elif keys[0] in ("embed_tokens", "lm_head"):
            table = int(size)
    return per_kind, table


@functools.lru_cache(maxsize=64)
def state_bytes(config: Qwen3VLConfig, mesh_sizes: MeshSizes, freeze: tuple[str, ...],
                optim: OptimizerSettings = OptimizerSettings(), rules: Rules = DEFAULT_RULES) -> StateBytes:
    """Per-device bytes of params, frozen params and optimizer state under `rules` on a mesh of these sizes.

    Optimizer leaves shaped like a parameter follow that parameter's layout (as `state_shardings` does);
    the rest (step counters) are replicated.
    """
    sizes = dict(mesh_sizes)
    mesh = abstract_mesh(sizes)
    reduced, layer_mult, block_mult = reduced_config(config)
    model = nnx.eval_shape(lambda: Qwen3VL(reduced, rngs=nnx.Rngs(0)))
    _, trainable, frozen = split_model(model, freeze)
    t_place = _placements(trainable, mesh, rules, layer_mult, block_mult)
    f_place = _placements(frozen, mesh, rules, layer_mult, block_mult)
    t_pairs = list(zip(jax.tree.leaves(trainable), jax.tree.leaves(t_place)))
    f_pairs = list(zip(jax.tree.leaves(frozen), jax.tree.leaves(f_place)))
    optimizer = make_optimizer(optim)
    opt_bytes = optax.tree_map_params(optimizer, _bytes, jax.eval_shape(optimizer.init, trainable), t_place,
                                      transform_non_params=lambda leaf: float(leaf.size * leaf.dtype.itemsize))
    kinds = {i: "moe" if reduced.text.is_moe_layer(i) else "dense" for i in range(reduced.text.num_hidden_layers)}
    gathered_layer, table = _gathered(nnx.state(model, nnx.Param), sizes, rules, kinds)
    return StateBytes(
        trainable=_total([_bytes(x, p) for x, p in t_pairs]),
        frozen=_total([_bytes(x, p) for x, p in f_pairs]),
        optimizer=_total(jax.tree.leaves(opt_bytes)),
        trainable_count=_total([math.prod(x.shape) * p.multiplicity for x, p in t_pairs]),
        frozen_count=_total([math.prod(x.shape) * p.multiplicity for x, p in f_pairs]),
        gathered_layer=gathered_layer,
        gathered_vocab_table=table,
    )
