"""Jitted entry points over a Qwen3VL: logits for host arrays, and greedy decoding with the KV cache.

The model is split into (graphdef, params) once, so each call is a pure jitted function of arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import DecodeCache, Qwen3VL, prepare_inputs


class Runner:
    """Holds a split model and its compiled functions (compiled once per input shape)."""

    def __init__(self, model: Qwen3VL):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self._logits = jax.jit(self._logits_fn)
        self._step = jax.jit(self._step_fn, donate_argnums=(3,))

    def _logits_fn(self, state, ids, positions, mask, vision):
        return nnx.merge(self.graphdef, state)(ids, positions, mask, vision).logits

    def _step_fn(self, state, ids, positions, cache, mask, vision):
        out = nnx.merge(self.graphdef, state)(ids, positions, mask, vision, cache=cache)
        return out.logits[:, -1].astype(jnp.float32), out.cache

    def logits(self, arrays: Mapping[str, Any]) -> np.ndarray:
        """Logits (fp32 numpy) for `input_ids`, `attention_mask` and optional `pixel_values`/`image_grid_thw`."""
        inp = self._prepare(arrays)
        out = self._logits(self.state, inp["input_ids"], inp["positions"], inp["attention_mask"], inp["vision"])
        return np.asarray(out.astype(jnp.float32))

    def _prepare(self, arrays: Mapping[str, Any]) -> dict:
        return prepare_inputs(self.config, arrays["input_ids"], arrays.get("attention_mask"),
                              arrays.get("pixel_values"), arrays.get("image_grid_thw"),
                              arrays.get("mm_token_type_ids"))

    def greedy(self, arrays: Mapping[str, Any], max_new_tokens: int, stop_ids: tuple[int, ...] = ()
               ) -> np.ndarray:
        """Greedy continuation (B, ≤ max_new_tokens) of a (left-padded) batch; rows stop at a stop id."""
        inp = self._prepare(arrays)
        ids = inp["input_ids"]
        batch, length = ids.shape
        mask = np.ones_like(ids, dtype=bool) if inp["attention_mask"] is None else inp["attention_mask"]
        cache = DecodeCache.create(self.config, batch, length + max_new_tokens)
        logits, cache = self._step(self.state, ids, inp["positions"], cache, mask, inp["vision"])
        valid = mask.sum(axis=1)
        done = np.zeros(batch, bool)
        out: list[np.ndarray] = []
        for _ in range(max_new_tokens):
            token = np.asarray(jnp.argmax(logits, axis=-1))
            token = np.where(done, stop_ids[0] if stop_ids else 0, token)
            out.append(token)
            done |= np.isin(token, stop_ids)
            if done.all():
                break
            positions = np.broadcast_to((valid + inp["deltas"])[None, :, None], (3, batch, 1)).astype(np.int32)
            logits, cache = self._step(self.state, token[:, None].astype(np.int32), positions, cache,
                                       np.ones((batch, 1), bool), None)
            valid = valid + 1
        return np.stack(out, axis=1)
