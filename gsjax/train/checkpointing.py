"""Orbax checkpoints of the sharded train state, the data iterator position and the run config.

Each step directory holds three items: `state` (every array of the TrainState, written shard by shard
by the devices that own it), `data` (the input pipeline's JSON state, so a resumed run sees the next
record rather than the first) and `config` (the run config as JSON). Orbax writes into
`<step>.orbax-checkpoint-tmp-*` and renames on commit, so a run killed mid-write leaves a temporary
directory that is never listed as a step; `restore_latest` additionally skips a step directory without
the metadata file that orbax writes last.

The state tree is stored as nested plain dicts named by the pytree path (`params/layers/0/mlp/...`):
nnx.State and optax's named tuples then need no orbax type support, the layout is readable by other
tools, and restoring rebuilds the exact tree structure of the target state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import jax
import orbax.checkpoint as ocp
from etils import epath

from gsjax.errors import InputError

from .state import ShardedSetup, TrainState, init_state

log = logging.getLogger(__name__)

STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data", "config"
_STEP_METADATA = "_CHECKPOINT_METADATA"  # written by orbax into the step directory before the commit


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or does not fit the state it is restored into."""


class CheckpointMismatch(InputError, CheckpointError):
    """The run directory holds checkpoints of another model, freeze list or optimizer than the config's."""


@dataclass
class Restored:
    state: TrainState
    data_state: dict[str, Any]
    step: int
    config: dict[str, Any] | None


# ---------------------------------------------------------------------- pytree <-> nested dict
def _key_name(key: Any) -> str | None:
    """One path component as a directory-safe name; None for an nnx Variable's `.value` hop."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return None if key.name == "value" else key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _leaf_names(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [tuple(n for n in map(_key_name, path) if n is not None) for path, _ in flat]
    return names, [leaf for _, leaf in flat], treedef


def to_nested(tree: Any) -> dict[str, Any]:
    """The leaves of any pytree as nested dicts keyed by their path names."""
    names, leaves, _ = _leaf_names(tree)
    out: dict[str, Any] = {}
    for name, leaf in zip(names, leaves):
        if not name:
            raise CheckpointError("the state must be a container, not a bare array")
        node = out
        for part in name[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"path {'/'.join(name)} collides with a leaf")
        if name[-1] in node:
            raise CheckpointError(f"two leaves share the path {'/'.join(name)}")
        node[name[-1]] = leaf
    return out


def from_nested(target: Any, nested: Mapping[str, Any]) -> Any:
    """Rebuild `target`'s tree structure (nnx.State, optax states, ...) with leaves from `nested`."""
    names, _, treedef = _leaf_names(target)
    leaves = []
    for name in names:
        node: Any = nested
        for part in name:
            if not isinstance(node, Mapping) or part not in node:
                raise CheckpointError(f"the checkpoint has no entry {'/'.join(name)}")
            node = node[part]
        leaves.append(node)
    return jax.tree.unflatten(treedef, leaves)


def abstract_state(state_like: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs carrying the target sharding of every leaf: what `restore` fills in.

    `state_like` holds arrays or ShapeDtypeStructs; `shardings` (same structure, e.g.
    `ShardedSetup.state_shardings`) overrides the shardings the leaves carry."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_like)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings)


def abstract_train_state(model_config: Any, freeze: Any, optimizer: Any, setup: ShardedSetup) -> TrainState:
    """The abstract TrainState `init_state` would build, with its shardings; nothing is allocated."""
    shapes = jax.eval_shape(lambda: init_state(model_config, freeze, optimizer, setup, seed=0))
    return abstract_state(shapes, setup.state_shardings)


def _flat_shapes(nested: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for key, value in nested.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flat_shapes(value, path))
        else:
            out[path] = tuple(value.shape)
    return out


# ---------------------------------------------------------------------- manager
def _as_path(directory: str | os.PathLike) -> epath.Path:
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """Committed steps, oldest first: finalized by orbax and holding its step metadata file."""
    path = _as_path(directory)
    if not path.exists():
        return []
    steps = ocp.path.step.checkpoint_steps(path)
    return sorted(s for s in steps if (path / str(s) / _STEP_METADATA).exists())


class Checkpointer:
    """Async, keep-N checkpoints of (train state, data iterator state, run config) under `directory`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 30, every: int = 1000,
                 async_save: bool = True, config: Mapping[str, Any] | None = None, read_only: bool = False):
        if keep < 1 or every < 1:
            raise CheckpointError(f"keep={keep} and every={every} must both be >= 1")
        self.directory = _as_path(directory)
        self.config = dict(config) if config is not None else None
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(every),
                                                         policies.PreemptionCheckpointingPolicy()]),
            preservation_policy=policies.LatestN(keep),
            save_interval_steps=0 if read_only else 1,  # unused (the policy decides); 0 quiets read-only
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # leftovers of a killed write
            create=not read_only,
            read_only=read_only,
        )
        handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: ocp.JsonCheckpointHandler(),
                    CONFIG_ITEM: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def save(self, step: int, state: TrainState, data_state: Mapping[str, Any] | None = None, *,
             force: bool = False) -> bool:
        """Start writing `state` at `step` if due (or `force`). Returns once device arrays are copied to
        host, so the caller may donate `state` to the next step; the write finishes in the background."""
        if step in self._manager.all_steps():
            return False  # e.g. the final step was also a periodic one
        args = ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(to_nested(state)),
            DATA_ITEM: ocp.args.JsonSave(dict(data_state or {})),
            CONFIG_ITEM: ocp.args.JsonSave(self.config or {}),
        })
        saved = self._manager.save(step, args=args, force=force)
        if saved:
            log.info("checkpoint at step %d started under %s", step, self.directory)
        return saved

    # ------------------------------------------------------------------ restoring
    def all_steps(self) -> list[int]:
        return complete_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, target: TrainState, step: int | None = None) -> Restored | None:
        """Restore into `target` (ShapeDtypeStructs or arrays with shardings): each device reads only its
        own slice, cast to the target dtype. `step=None` means the latest committed step; None when there
        is none. A target whose tree or shapes differ from the checkpoint raises CheckpointError."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        abstract = to_nested(abstract_state(target))
        self._check_fits(step, abstract)
        args = ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(abstract),
            DATA_ITEM: ocp.args.JsonRestore(),
            CONFIG_ITEM: ocp.args.JsonRestore(),
        })
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"restoring checkpoint step {step} under {self.directory} failed: {e}") from e
        state = from_nested(target, restored[STATE_ITEM])
        return Restored(state, dict(restored[DATA_ITEM] or {}), step, restored[CONFIG_ITEM] or None)

    def saved_config(self, step: int) -> dict[str, Any]:
        """The run config stored with `step` (to rebuild the model, e.g. for `gsjax export`)."""
        if step not in self.all_steps():
            raise CheckpointError(f"no committed checkpoint step {step} under {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
        config = restored[CONFIG_ITEM]
        if not config:
            raise CheckpointError(f"checkpoint step {step} under {self.directory} holds no run config")
        return dict(config)

    def _check_fits(self, step: int, abstract: Mapping[str, Any]) -> None:
        """Compare paths and shapes with the checkpoint's metadata first: one clear error listing every
        difference, instead of a failure halfway through reading the arrays."""
        saved = self._manager.item_metadata(step)[STATE_ITEM]
        saved_shapes = _flat_shapes(getattr(saved, "tree", saved) or {})
        wanted = _flat_shapes(abstract)
        problems = [f"{p}: not in the checkpoint" for p in wanted if p not in saved_shapes]
        problems += [f"{p}: in the checkpoint, not in the target" for p in saved_shapes if p not in wanted]
        problems += [f"{p}: shape {saved_shapes[p]} in the checkpoint, {shape} in the target"
                     for p, shape in wanted.items() if p in saved_shapes and saved_shapes[p] != shape]
        if problems:
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise CheckpointMismatch(f"checkpoint step {step} under {self.directory} does not fit the target state "
                                     f"(changed model, freeze list or optimizer? a new run needs a new "
                                     f"train.out_dir): {'; '.join(problems[:10])}{more}")

    # ------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        """Block until the write in flight (if any) is committed and old steps are pruned."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore_latest(directory: str | os.PathLike, target: TrainState
                   ) -> tuple[TrainState, dict[str, Any], int] | None:
    """(state, data_state, step) from the newest committed checkpoint, or None when there is none."""
    if not complete_steps(directory):
        return None
    with Checkpointer(directory, read_only=True) as ckpt:
        restored = ckpt.restore(target)
    if restored is None:
        return None
    return restored.state, restored.data_state, restored.step
