"""Logical axis names → mesh axes, by an ordered rule list kept in config (MaxText's idiom).

Every parameter carries `logical_axes` metadata; activations are constrained with `constrain(x, names)`.
A layout is a change of rules, never of model code. Checks fail loudly when a dimension does not divide
the mesh axes it maps to, and when a large parameter ends up fully replicated on a multi-device mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gsjax.errors import InputError

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Ordered: the first rule for a logical name whose mesh axes are still free in the spec wins.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("experts_router", None),
    ("vit_patch", None),
    ("vit_pos", None),
    ("vit_embed", "fsdp"),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_merged", "fsdp"),
    ("vit_merged_out", "tensor"),
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

LARGE_PARAM_ELEMENTS = 2**22  # ~4M elements: replicating such a tensor on every device is a layout bug


class ShardingError(InputError, ValueError):
    """A dimension does not divide its mesh axes, or a large parameter is fully replicated."""


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh, rules: Rules,
                    what: str = "array") -> PartitionSpec:
    """PartitionSpec for one array. Mesh axes of size 1 are dropped; each mesh axis is used once."""
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, name in enumerate(names):
        chosen: tuple[str, ...] = ()
        for rule_name, axes in rules:
            if rule_name != name:
                continue
            candidate = tuple(a for a in _as_tuple(axes) if mesh.shape[a] > 1)
            if used.intersection(candidate):
                continue
            chosen = candidate
            break
        if chosen and shape is not None:
            size = math.prod(mesh.shape[a] for a in chosen)
            if shape[dim] % size:
                raise ShardingError(
                    f"{what}: dimension {dim} ({name}) of size {shape[dim]} does not divide mesh axes "
                    f"{chosen} of size {size}; change the sharding rules or the mesh")
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    large: int = LARGE_PARAM_ELEMENTS) -> nnx.State:
    """A NamedSharding per variable of an (abstract) nnx state, from its `logical_axes` metadata."""
    replicated_large: list[str] = []

    def one(path, var):
        names = var.get_metadata().get("logical_axes")
        dotted = ".".join(str(p) for p in path)
        if names is None:
            spec = PartitionSpec()
        else:
            spec = logical_to_spec(names, var.shape, mesh, rules, what=f"parameter {dotted}")
        if mesh.size > 1 and not any(spec) and math.prod(var.shape) >= large:
            replicated_large.append(f"{dotted} {tuple(var.shape)}")
        return var.replace(NamedSharding(mesh, spec))

    shardings = nnx.map_state(one, state)
    if replicated_large and mesh.size > mesh.shape.get("data", 1):
        raise ShardingError(f"large parameters are fully replicated on mesh {dict(mesh.shape)}: "
                            f"{replicated_large[:5]}; add sharding rules for their logical axes")
    return shardings


# ---------------------------------------------------------------- activations
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("gsjax_rules", default=None)


@contextlib.contextmanager
def logical_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Within this context, `constrain` pins activations to the layout the rules give."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside `logical_sharding` (single device)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, x.shape, mesh, rules, what=f"activation {tuple(names)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES, batch_dim: int = 0) -> NamedSharding:
    """Sharding of an input array whose `batch_dim` is the batch: split over the act_batch axes."""
    names: list[str | None] = [None] * ndim
    names[batch_dim] = "act_batch"
    return NamedSharding(mesh, logical_to_spec(names, None, mesh, rules))


def batch_parts(mesh: Mesh, rules: Rules) -> int:
    """How many ways the global batch is split (the product of the mesh axes `act_batch` maps to)."""
    spec = batch_sharding(mesh, 2, rules).spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return int(math.prod([mesh.shape[a] for a in axes])) if axes else 1


def rules_from_config(overrides: Sequence[Sequence] | None) -> tuple[tuple[str, MeshAxes], ...]:
    """Config rules (a list of [logical, axes]) come first, then the defaults they did not override."""
    if not overrides:
        return DEFAULT_RULES
    parsed: list[tuple[str, MeshAxes]] = []
    for item in overrides:
        if len(item) != 2:
            raise ShardingError(f"sharding rule {item!r} must be [logical_name, mesh_axes]")
        name, axes = item
        parsed.append((str(name), tuple(axes) if isinstance(axes, list) else axes))
    return (*parsed, *DEFAULT_RULES)


def describe(shardings: Mapping | nnx.State) -> dict[str, str]:
    """Parameter path → partition spec text (for logs and the layout benchmark)."""
    flat = nnx.to_flat_state(shardings) if isinstance(shardings, nnx.State) else shardings.items()
    return {".".join(map(str, p)): str(s.get_value().spec if hasattr(s, "get_value") else s.spec)
            for p, s in flat}
