"""The whole Qwen3-VL model: embed, merge image features, DeepStack injection, decoder, head.

`Qwen3VL.__call__` is a pure function of arrays with static shapes (jit it via nnx.jit or split/merge);
`prepare_inputs` does the host-side work (M-RoPE positions, vision tables) in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsjax.parallel.sharding import constrain

from .attention import cached_mask, causal_mask
from .config import Qwen3VLConfig
from .layers import KeySource, ParamKeys, RMSNorm, dtype_of, make_param, remat_policy
from .rope import get_rope_index, mrope_cos_sin
from .text import DecoderLayer, LayerCache, RouterStats
from .vision import VisionInputs, VisionTower, vision_inputs

RESIDUAL = ("act_batch", "act_length", "act_embed")
LOGITS = ("act_batch", "act_length", "act_vocab")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DecodeCache:
    """KV cache for all layers plus, per row, which slots hold real tokens and where the next write goes."""

    layers: list[LayerCache]
    kv_valid: jax.Array  # (B, S_max) bool
    lengths: jax.Array  # (B,) int32 next write offset

    @classmethod
    def create(cls, config: Qwen3VLConfig, batch: int, max_len: int, dtype: jnp.dtype | None = None
               ) -> DecodeCache:
        t = config.text
        dt = dtype or dtype_of(config.runtime.dtype)
        shape = (batch, t.num_key_value_heads, max_len, t.head_dim)  # head-major: see LayerCache
        layers = [LayerCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt)) for _ in range(t.num_hidden_layers)]
        return cls(layers=layers, kv_valid=jnp.zeros((batch, max_len), bool),
                   lengths=jnp.zeros((batch,), jnp.int32))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ModelOutput:
    logits: jax.Array | None  # (B, L, V) in the activation dtype; (B, T, V) for a logits_index; None if skipped
    cache: DecodeCache | None = None
    router: RouterStats | None = None  # summed over MoE layers (None for dense models)
    hidden: jax.Array | None = None  # final-norm hidden states when asked for


class Qwen3VL(nnx.Module):
    def __init__(self, config: Qwen3VLConfig, rngs: KeySource):
        config.validate()
        rngs = ParamKeys.of(rngs)  # one key from nnx.Rngs; every parameter folds a Python count into it
        t = config.text
        pdt = dtype_of(config.runtime.param_dtype)
        self.config = config
        self.dtype = dtype_of(config.runtime.dtype)
        self.visual = VisionTower(config, rngs)
        self.embed_tokens = make_param(rngs, (t.vocab_size, t.hidden_size), ("vocab", "embed"), pdt)
        self.layers = nnx.List([DecoderLayer(config, i, pdt, rngs) for i in range(t.num_hidden_layers)])
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, "embed", pdt, rngs)
        self.lm_head = (None if config.tie_word_embeddings
                        else make_param(rngs, (t.hidden_size, t.vocab_size), ("embed", "vocab"), pdt))

    def __call__(self, input_ids: jax.Array, positions: jax.Array, attention_mask: jax.Array | None = None,
                 vision: VisionInputs | None = None, *, cache: DecodeCache | None = None,
                 return_hidden: bool = False, logits_index: jax.Array | None = None,
                 compute_logits: bool = True, kv_window: int | None = None,
                 kv_bound: jax.Array | None = None) -> ModelOutput:
        """input_ids (B, L); positions (3, B, L) M-RoPE ids; attention_mask (B, L) of valid tokens.

        With `cache`, the L new tokens are written after each row's cached tokens and attend to them.
        `logits_index` (B, T) picks the positions whose logits are computed (a sampler's prefill needs one
        per row; the full (B, L, V) logits of a long prompt would cost a vocab-sized matmul per token).
        `compute_logits=False` stops at the final-norm hidden states (returned as `hidden`): a loss can then
        apply `lm_head_matrix()` chunk by chunk instead of holding all (B, L, V) logits at once.
        `kv_window` (static, with `cache`): the new tokens attend only over the cache's first `kv_window` slots,
        so a decode step costs what its longest row needs, not the whole preallocated cache; every row's
        cached and new tokens must lie inside the window (the caller's bookkeeping guarantees it).
        `kv_bound` (traced int, with `cache`): no row whose output the caller reads attends to cache slot
        `kv_bound` or later, so the blocked decode kernel stops there (a sampler's idle slots keep advancing
        and would otherwise set the bound).
        """
        cfg = self.config
        if kv_window is not None and cache is None:
            raise ValueError("kv_window limits the attention over a KV cache: pass cache too")
        # FSDP gathers the table's embed dim for the lookup; the vocab dim may stay tensor-sharded.
        table = constrain(self.embed_tokens[...].astype(self.dtype), ("vocab", None))
        x = table[input_ids]
        deepstack: list[jax.Array] = []
        visual_mask = None
        if vision is not None:
            image_embeds, deepstack = self.visual(vision)
            visual_mask = (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)
            x = scatter_visual(x, visual_mask, image_embeds)
        x = constrain(x, RESIDUAL)
        cos, sin = mrope_cos_sin(positions, cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section,
                                 self.dtype)
        cache_offsets = None
        if cache is None:
            mask = causal_mask(attention_mask)
        else:
            cache, mask, cache_offsets = _advance_cache(cache, input_ids.shape[1], attention_mask, kv_window, kv_bound)
            if cache.kv_valid.shape[1] == input_ids.shape[1]:
                # A cache exactly as long as the new tokens is filled from slot 0 (a prefill; any other offset
                # would not fit), so plain causal self-attention is the same mask and can use the fast kernels.
                mask = causal_mask(attention_mask)
        new_layer_caches: list[LayerCache] = []
        router: RouterStats | None = None
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            x, layer_cache, stats = _run_layer(
                layer, x, cos, sin, mask, attention_mask, layer_cache, cache_offsets,
                remat_policy(cfg.runtime.remat_for_layer(i, cfg.text.num_hidden_layers)), kv_window)
            x = constrain(x, RESIDUAL)
            new_layer_caches.append(layer_cache)
            if stats is not None:
                router = stats if router is None else jax.tree.map(jnp.add, router, stats)
            if i < len(deepstack):  # DeepStack: features of vision tap i go after text layer i
                x = scatter_visual(x, visual_mask, deepstack[i], add=True)
        hidden = self.norm(x)
        logits = None
        if compute_logits:
            picked = hidden if logits_index is None else jnp.take_along_axis(hidden, logits_index[..., None], axis=1)
            logits = constrain(picked @ self.lm_head_matrix(), LOGITS)
        if cache is not None:
            cache = DecodeCache(layers=new_layer_caches, kv_valid=cache.kv_valid, lengths=cache.lengths)
        keep_hidden = return_hidden or not compute_logits
        return ModelOutput(logits=logits, cache=cache, router=router, hidden=hidden if keep_hidden else None)

    def lm_head_matrix(self) -> jax.Array:
        """(hidden, vocab) output projection in the compute dtype (the embedding, transposed, when tied)."""
        return (self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]).astype(self.dtype)


def scatter_visual(x: jax.Array, visual_mask: jax.Array, feats: jax.Array, add: bool = False) -> jax.Array:
    """Place (or add) feature rows at the visual token positions in row-major (batch, seq) order.

    Static-shape form of HF's masked_scatter: the k-th visual position takes feats[k]; feats may carry
    extra padding rows at the end, which are never read.
    """
    flat_mask = visual_mask.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, feats.shape[0] - 1)
    gathered = feats.astype(x.dtype)[idx].reshape(x.shape)
    if add:
        return x + jnp.where(visual_mask[..., None], gathered, jnp.zeros_like(gathered))
    return jnp.where(visual_mask[..., None], gathered, x)


def _advance_cache(cache: DecodeCache, num_new: int, attention_mask: jax.Array | None, window: int | None = None,
                   bound: jax.Array | None = None):
    """Mark the new tokens' slots valid, and build the mask that lets them see their row's cache (its first
    `window` slots when given: the keys the attention will read)."""
    batch = cache.lengths.shape[0]
    offsets = cache.lengths
    new_valid = (jnp.ones((batch, num_new), bool) if attention_mask is None
                 else attention_mask.astype(bool))
    kv_valid = jax.vmap(lambda row, new, off: jax.lax.dynamic_update_slice(row, new, (off,)))(
        cache.kv_valid, new_valid, offsets)
    q_index = offsets[:, None] + jnp.arange(num_new)[None, :]
    updated = DecodeCache(layers=cache.layers, kv_valid=kv_valid, lengths=offsets + num_new)
    if window is not None and not 0 < window <= kv_valid.shape[1]:
        raise ValueError(f"kv_window={window} must be in [1, {kv_valid.shape[1]}] (the cache length)")
    return updated, cached_mask(q_index, kv_valid[:, :window], bound), offsets


def _run_layer(layer: DecoderLayer, x, cos, sin, mask, token_valid, layer_cache, cache_offsets, policy,
               kv_window: int | None = None):
    if policy is None:
        return layer(x, cos, sin, mask, token_valid, layer_cache, cache_offsets, kv_window)
    fn = nnx.remat(lambda m, *a: m(*a, kv_window), policy=policy)
    return fn(layer, x, cos, sin, mask, token_valid, layer_cache, cache_offsets)


def prepare_inputs(config: Qwen3VLConfig, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                   pixel_values: np.ndarray | None = None, image_grid_thw: np.ndarray | None = None,
                   mm_token_type_ids: np.ndarray | None = None, pad_vision_to: int | None = None) -> dict:
    """Host-side inputs for `Qwen3VL.__call__`: positions (3,B,L), deltas (B,), and VisionInputs.

    Checks that the number of image placeholder tokens matches the grids, since the jitted model
    cannot (a mismatch would silently misplace features).
    """
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    mask = None if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
    positions, deltas = get_rope_index(
        ids, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        spatial_merge_size=config.vision.spatial_merge_size, mm_token_type_ids=mm_token_type_ids,
        attention_mask=mask, image_grid_thw=image_grid_thw)
    out: dict = {"input_ids": ids.astype(np.int32), "positions": positions, "deltas": deltas,
                 "attention_mask": None if mask is None else mask.astype(bool), "vision": None}
    n_placeholders = int(np.sum(ids == config.image_token_id))
    if pixel_values is None:
        if n_placeholders:
            raise ValueError(f"input_ids hold {n_placeholders} image tokens but no pixel_values were given")
        return out
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    expected = int(grid.prod(axis=1).sum()) // config.vision.merge_unit
    if n_placeholders != expected:
        raise ValueError(
            f"input_ids hold {n_placeholders} image tokens but image_grid_thw {grid.tolist()} gives {expected}")
    out["vision"] = vision_inputs(pixel_values, grid, config.vision, pad_to=pad_vision_to,
                                  max_frame_rows=config.runtime.vision_max_frame_rows)
    return out
