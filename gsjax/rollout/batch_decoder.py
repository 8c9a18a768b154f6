"""The device side of the embedded sampler: a fixed set of decode slots over one preallocated KV cache.

Two jitted programs, both with static shapes so decoding never recompiles per token:
  prefill  (rows bucket × prompt-length bucket): prompts (+ images, the vision tower runs once) into a
           fresh cache exactly as long as the bucket, the first token sampled, and the rows copied into
           their slots of the big cache (filler rows target an out-of-range slot and are dropped);
           with a `window` (prefix reuse), the rows are prompt suffixes: each slot's first `window` cache
           columns are gathered, the suffix is written after the slot's reused prefix and attends to it,
           and the rows go back;
  decode   (all slots, one token each, per window bucket): every slot advances one token, attending only over
           the first `window` cache slots (the host picks the smallest bucket that holds its longest live row, so
           short sequences do not pay for the whole preallocated cache; on CPU the decode kernel itself stops at
           the longest live row, and the host passes the whole cache); idle slots compute garbage that the
           host ignores, which is cheaper than a shape change.
The cache, the per-slot sampling state and the parameters live on the same mesh as training (logical
axis rules); cache and state are donated, so each step updates them in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gsjax.models.qwen3_vl.model import DecodeCache, Qwen3VL
from gsjax.models.qwen3_vl.text import LayerCache
from gsjax.parallel.multihost import place_vision
from gsjax.parallel.sharding import (
    DEFAULT_RULES,
    Rules,
    batch_sharding,
    logical_sharding,
    logical_to_spec,
    param_shardings,
)

from .sampling import Mode, sample_tokens
from .slots import PrefillBatch


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SlotState:
    """Per-slot decode inputs and sampling parameters, kept on device between steps."""

    tokens: jax.Array  # (B,) int32 last sampled token: the next step's input
    positions: jax.Array  # (B,) int32 its M-RoPE position (all three axes)
    counts: jax.Array  # (B,) int32 tokens sampled so far: the RNG stream index of the next one
    key_data: jax.Array  # (B, 2) uint32 per-request key
    temperature: jax.Array  # (B,) float32
    top_k: jax.Array  # (B,) int32
    top_p: jax.Array  # (B,) float32

    @classmethod
    def empty(cls, slots: int) -> SlotState:
        zeros = jnp.zeros((slots,), jnp.int32)
        return cls(tokens=zeros, positions=zeros, counts=zeros, key_data=jnp.zeros((slots, 2), jnp.uint32),
                   temperature=jnp.zeros((slots,), jnp.float32), top_k=zeros, top_p=jnp.ones((slots,), jnp.float32))

    def insert(self, slots: jax.Array, batch: PrefillBatch, tokens: jax.Array) -> SlotState:
        """Rows of a prefill batch into their slots; out-of-range slots (filler rows) are dropped."""

        def put(dst, src):
            return dst.at[slots].set(src.astype(dst.dtype), mode="drop")

        return SlotState(tokens=put(self.tokens, tokens), positions=put(self.positions, batch.next_position),
                         counts=put(self.counts, jnp.ones_like(tokens)), key_data=put(self.key_data, batch.key_data),
                         temperature=put(self.temperature, batch.temperature), top_k=put(self.top_k, batch.top_k),
                         top_p=put(self.top_p, batch.top_p))


def batch_parallelism(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> int:
    """How many devices split the batch dimension: every batch (slots, prefill rows) must be a multiple."""
    if mesh is None:
        return 1
    spec = batch_sharding(mesh, 1, rules).spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _committed(tree):
    """Pin arrays to their current devices. The jit cache keys on committedness, and step outputs are
    committed, so inputs that start out uncommitted would cost one extra compile of every program."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding), tree)


def gather_rows(cache: DecodeCache, slots: jax.Array, offsets: jax.Array, window: int) -> DecodeCache:
    """The first `window` columns of some slots' rows, of which the first `offsets` (a reused prefix) stay
    valid; writes go after them. Out-of-range slots (filler rows) read the last slot and are never stored."""
    rows = jnp.minimum(slots, cache.lengths.shape[0] - 1)
    valid = jnp.arange(window)[None, :] < offsets[:, None]
    layers = [LayerCache(k=layer.k[rows, :, :window], v=layer.v[rows, :, :window]) for layer in cache.layers]
    return DecodeCache(layers=layers, kv_valid=valid, lengths=offsets.astype(jnp.int32))


def insert_rows(cache: DecodeCache, fresh: DecodeCache, slots: jax.Array, valid: jax.Array,
                lengths: jax.Array) -> DecodeCache:
    """Copy prefilled rows (a cache of P columns) into slots of the big cache; the rest of a slot's row is
    marked invalid, and its next write goes to `lengths` (the prompt length, over the right padding)."""
    rows, width = valid.shape
    layers = [LayerCache(k=big.k.at[slots, :, :width].set(new.k.astype(big.k.dtype), mode="drop"),
                         v=big.v.at[slots, :, :width].set(new.v.astype(big.v.dtype), mode="drop"))
              for big, new in zip(cache.layers, fresh.layers)]
    row_valid = jnp.zeros((rows, cache.kv_valid.shape[1]), bool).at[:, :width].set(valid)
    return DecodeCache(layers=layers, kv_valid=cache.kv_valid.at[slots].set(row_valid, mode="drop"),
                       lengths=cache.lengths.at[slots].set(lengths, mode="drop"))


class BatchDecoder:
    """Parameters, KV cache and slot state of `num_slots` sequences of at most `max_len` tokens each.

    Not thread-safe except for `set_params`, which swaps the weights between two steps.
    """

    def __init__(self, model: Qwen3VL, num_slots: int, max_len: int, *, mesh: Mesh | None = None,
                 rules: Rules = DEFAULT_RULES, version: str = "0"):
        self.config = model.config
        self.num_slots, self.max_len = num_slots, max_len
        self.mesh, self.rules = mesh, tuple(rules)
        self.graphdef, params = nnx.split(model)
        if mesh is not None:
            params = jax.device_put(params, param_shardings(params, mesh, self.rules))
        params = _committed(params)
        self._weights = (params, version)
        self._lock = threading.Lock()
        cache_s, state_s, token_s = self._shardings()
        outs = None if mesh is None else (cache_s, state_s, token_s, token_s)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("mode", "window"),
                                donate_argnames=("cache", "state"), out_shardings=outs)
        self._decode = jax.jit(self._decode_fn, static_argnames=("mode", "window"), donate_argnames=("cache", "state"),
                               out_shardings=outs)
        empty = jax.jit(self._empty, out_shardings=None if mesh is None else (cache_s, state_s))
        self.cache, self.state = _committed(empty())

    # ---------------------------------------------------------------- layout
    def _shardings(self):
        """NamedShardings of the cache and slot state (batch over the batch axes, kv heads over tensor)."""
        if self.mesh is None:
            return None, None, None
        mesh, rules, t = self.mesh, self.rules, self.config.text
        kv_shape = (self.num_slots, t.num_key_value_heads, self.max_len, t.head_dim)
        kv = NamedSharding(mesh, logical_to_spec(("act_batch", "act_heads", "act_length", None), kv_shape, mesh,
                                                 rules, what="KV cache"))
        rows1, rows2 = batch_sharding(mesh, 1, rules), batch_sharding(mesh, 2, rules)
        cache = DecodeCache(layers=[LayerCache(k=kv, v=kv) for _ in range(t.num_hidden_layers)], kv_valid=rows2,
                            lengths=rows1)
        state = SlotState(tokens=rows1, positions=rows1, counts=rows1, key_data=rows2, temperature=rows1,
                          top_k=rows1, top_p=rows1)
        return cache, state, NamedSharding(mesh, PartitionSpec())

    def _rules(self):
        return contextlib.nullcontext() if self.mesh is None else logical_sharding(self.mesh, self.rules)

    def _put_batch(self, batch: PrefillBatch) -> PrefillBatch:
        """Host prefill arrays onto the mesh: rows and image patch rows split over the batch axes."""
        if self.mesh is None:
            return batch
        mesh, rules = self.mesh, self.rules
        placed = {f.name: jax.device_put(getattr(batch, f.name), batch_sharding(mesh, getattr(batch, f.name).ndim,
                                                                                 rules))
                  for f in dataclasses.fields(batch) if f.name not in ("positions", "vision")}
        placed["positions"] = jax.device_put(batch.positions, batch_sharding(mesh, 3, rules, batch_dim=1))
        placed["vision"] = None if batch.vision is None else place_vision(batch.vision, mesh, rules)
        return PrefillBatch(**placed)

    # ---------------------------------------------------------------- pure functions
    def _empty(self) -> tuple[DecodeCache, SlotState]:
        return DecodeCache.create(self.config, self.num_slots, self.max_len), SlotState.empty(self.num_slots)

    def _prefill_fn(self, params, cache: DecodeCache, state: SlotState, batch: PrefillBatch, *, mode: Mode,
                    window: int | None):
        model = nnx.merge(self.graphdef, params)
        rows, width = batch.input_ids.shape
        with self._rules():
            if window is None:
                rows_cache = DecodeCache.create(self.config, rows, width, dtype=cache.layers[0].k.dtype)
            else:
                rows_cache = gather_rows(cache, batch.slots, batch.offsets, window)
            out = model(batch.input_ids, batch.positions, batch.attention_mask, batch.vision, cache=rows_cache,
                        logits_index=batch.last_index[:, None])
        tokens, logprobs = sample_tokens(out.logits[:, 0], batch.key_data, jnp.zeros((rows,), jnp.int32),
                                         batch.temperature, batch.top_k, batch.top_p, mode)
        cache = insert_rows(cache, out.cache, batch.slots, out.cache.kv_valid,
                            batch.offsets + batch.last_index + 1)
        return cache, state.insert(batch.slots, batch, tokens), tokens, logprobs

    def _decode_fn(self, params, cache: DecodeCache, state: SlotState, bound: jax.Array, *, mode: Mode,
                   window: int):
        model = nnx.merge(self.graphdef, params)
        slots = state.tokens.shape[0]
        positions = jnp.broadcast_to(state.positions[None, :, None], (3, slots, 1))
        with self._rules():
            out = model(state.tokens[:, None], positions, jnp.ones((slots, 1), bool), None, cache=cache,
                        kv_window=window, kv_bound=bound)
        tokens, logprobs = sample_tokens(out.logits[:, -1], state.key_data, state.counts, state.temperature,
                                         state.top_k, state.top_p, mode)
        state = dataclasses.replace(state, tokens=tokens, positions=state.positions + 1, counts=state.counts + 1)
        return out.cache, state, tokens, logprobs

    # ---------------------------------------------------------------- host API
    @property
    def version(self) -> str:
        return self._weights[1]

    def prefill(self, batch: PrefillBatch, mode: Mode, window: int | None = None) -> tuple[jax.Array, jax.Array, str]:
        """Dispatch one prefill (asynchronously); returns the first tokens, their logprobs and the version.

        `window` (prefix reuse): the rows are suffixes written after `batch.offsets` cached tokens of their
        slots, attending over the slots' first `window` columns, which must hold every row's prefix and its
        whole padded suffix. Each distinct window is one compiled variant.
        """
        rows, width = batch.input_ids.shape
        if window is not None and not (0 < window <= self.max_len and int(np.max(batch.offsets)) + width <= window):
            raise ValueError(f"prefill window {window} must hold the longest reused prefix "
                             f"({int(np.max(batch.offsets))}) plus the {width} suffix columns, within {self.max_len}")
        params, version = self._weights
        self.cache, self.state, tokens, logprobs = self._prefill(params, self.cache, self.state,
                                                                 self._put_batch(batch), mode=mode, window=window)
        return tokens, logprobs, version

    def decode(self, mode: Mode, window: int | None = None, bound: int | None = None
               ) -> tuple[jax.Array, jax.Array, str]:
        """Dispatch one decode step of every slot; returns (B,) tokens, logprobs and the version used.

        `window`: the slots the step attends over (default all `max_len`); it must cover every live row's cached
        tokens plus the new one. Each distinct window is one compiled variant, so pass a few buckets only.
        `bound` (default: the window): the cache length after this step of the longest row whose token will be
        read; rows past it (idle slots) compute garbage. A traced value: any bound reuses the same program.
        """
        window = self.max_len if window is None else window
        if not 0 < window <= self.max_len:
            raise ValueError(f"decode window {window} is outside [1, {self.max_len}]")
        bound = window if bound is None else bound
        if not 0 < bound <= window:
            raise ValueError(f"decode bound {bound} is outside [1, window {window}]")
        params, version = self._weights
        self.cache, self.state, tokens, logprobs = self._decode(params, self.cache, self.state, np.int32(bound),
                                                                mode=mode, window=window)
        return tokens, logprobs, version

    def set_params(self, params: nnx.State, version: str, copy: bool = True) -> None:
        """Replace (a subset of) the parameters by path, cast and laid out like the current ones.

        Copies by default: the caller (a learner) may donate its buffers in its next step.
        """
        with self._lock:
            current = dict(nnx.to_flat_state(self._weights[0]))
            updates: dict[tuple, jax.Array] = {}
            for path, var in nnx.to_flat_state(params):
                if path not in current:
                    raise ValueError(f"parameter {'.'.join(map(str, path))} is not part of the sampler's model")
                old = current[path][...]
                new = var[...] if isinstance(var, nnx.Variable) else var
                if tuple(new.shape) != tuple(old.shape):
                    raise ValueError(f"parameter {'.'.join(map(str, path))} has shape {tuple(new.shape)}, "
                                     f"the sampler's {tuple(old.shape)}")
                updates[path] = jax.device_put(jnp.asarray(new).astype(old.dtype), old.sharding,
                                               may_alias=None if not copy else False)
            merged = nnx.from_flat_state([(p, v.replace(updates[p]) if p in updates else v)
                                          for p, v in current.items()])
            jax.block_until_ready(list(updates.values()))
            self._weights = (merged, version)

    def compilations(self) -> dict[str, int]:
        """How many variants of each program are compiled (one per shape bucket and sampling mode)."""
        return {"prefill": self._prefill._cache_size(), "decode": self._decode._cache_size()}
