"""Qwen3-VL vision tower: patch embed, interpolated learned positions, 2-D rotary, blocks, mergers, DeepStack.

Everything that depends on the image grids (interpolation taps, rotary positions, segment ids) is
computed on the host by `vision_inputs` into fixed-shape arrays, so the tower itself is one jitted
function of static shape; rows may be padded to a bucket (padding rows are their own segment and are
never gathered into the text stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import attend, segment_mask
from .config import Qwen3VLConfig, VisionConfig
from .layers import Dense, KeySource, LayerNorm, dtype_of, make_param, remat_policy, zeros_init
from .rope import apply_rotary, vision_cos_sin


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class VisionInputs:
    """Patchified pixels plus the grid-derived tables the tower needs, all with N rows (N % 4 == 0)."""

    pixel_values: jax.Array  # (N, C·T·P·P)
    pos_index: jax.Array  # (N, 4) int32 taps into the flattened position table
    pos_weight: jax.Array  # (N, 4) float32 bilinear weights
    rope_pos: jax.Array  # (N, 2) int32 (row, col) of each patch
    segment_ids: jax.Array  # (N,) int32, one id per image frame; padding rows -1


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear align_corners=True taps/weights along one axis, in fp32 like HF (spec §2.1)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    weights = np.clip(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets), 0, None)
    return taps, weights.astype(np.float32)


def vision_inputs(pixel_values: np.ndarray, grid_thw: np.ndarray, cfg: VisionConfig,
                  pad_to: int | None = None, max_frame_rows: int = 0) -> VisionInputs:
    """Host-side preparation of one batch of images for the tower (numpy arrays).

    `max_frame_rows` (the runtime's `vision_max_frame_rows`; 0: unbounded) refuses any larger frame: the
    tower's banded attention would not see all of it."""
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    check_frame_rows(grid, max_frame_rows)
    pixel_values = np.asarray(pixel_values)
    m, side = cfg.spatial_merge_size, cfg.grid_side
    counts = grid.prod(axis=1)
    total = int(counts.sum())
    if pixel_values.shape != (total, cfg.patch_dim):
        raise ValueError(
            f"pixel_values shape {pixel_values.shape} does not match image_grid_thw {grid.tolist()} "
            f"(expected ({total}, {cfg.patch_dim}))"
        )
    if np.any(grid[:, 1:] % m):
        raise ValueError(f"image_grid_thw {grid.tolist()} has h or w not divisible by merge size {m}")
    heights = np.repeat(grid[:, 1], counts)
    widths = np.repeat(grid[:, 2], counts)
    starts = np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    within = (np.arange(total) - starts) % (heights * widths)  # index inside one frame, merge-block order
    in_col, in_row = within % m, (within // m) % m
    blocks_w = widths // m
    block_col, block_row = (within // (m * m)) % blocks_w, within // (m * m * blocks_w)
    row, col = block_row * m + in_row, block_col * m + in_col
    h_taps, h_w = _axis_taps(row, heights, side)
    w_taps, w_w = _axis_taps(col, widths, side)
    pos_index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(total, 4)
    pos_weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(total, 4)
    frames = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    segment_ids = np.repeat(np.arange(frames.size), frames)
    out = dict(pixel_values=pixel_values.astype(np.float32), pos_index=pos_index.astype(np.int32),
               pos_weight=pos_weight, rope_pos=np.stack([row, col], -1).astype(np.int32),
               segment_ids=segment_ids.astype(np.int32))
    if pad_to is not None:
        out = _pad_rows(out, pad_to)
    return VisionInputs(**out)


def check_frame_rows(grid_thw: np.ndarray, max_frame_rows: int) -> None:
    """Raise if an image frame has more patch rows (h·w of its grid) than `max_frame_rows` (0: no bound)."""
    if max_frame_rows <= 0:
        return
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    rows = grid[:, 1] * grid[:, 2]
    if rows.size and rows.max() > max_frame_rows:
        i = int(np.argmax(rows))
        raise ValueError(f"image {i} (grid {grid[i].tolist()}) has {int(rows[i])} patch rows per frame, more than "
                         f"runtime.vision_max_frame_rows={max_frame_rows}: raise the bound or lower max_pixels")


def longest_segment(segment_ids: jax.Array) -> jax.Array:
    """The most rows any segment id >= 0 has (padding rows, id -1, are not counted)."""
    counts = jax.ops.segment_sum(jnp.ones_like(segment_ids), segment_ids, num_segments=segment_ids.shape[0])
    return jnp.max(counts)


def pad_vision(inputs: VisionInputs, rows: int) -> VisionInputs:
    """`inputs` with padding rows (their own segment, -1; never gathered) appended up to `rows`."""
    arrays = {name: np.asarray(getattr(inputs, name)) for name in VisionInputs.__dataclass_fields__}
    return VisionInputs(**_pad_rows(arrays, rows))


def _pad_rows(arrays: dict[str, np.ndarray], pad_to: int) -> dict[str, np.ndarray]:
    total = arrays["pixel_values"].shape[0]
    if pad_to < total or pad_to % 4:
        raise ValueError(f"pad_to={pad_to} must be a multiple of 4 and >= {total} patch rows")
    fill = {"segment_ids": -1}
    return {k: np.concatenate([a, np.full((pad_to - total, *a.shape[1:]), fill.get(k, 0), a.dtype)])
            for k, a in arrays.items()}


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, param_dtype: jnp.dtype, rngs: KeySource):
        d, nh, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.cfg = cfg
        self.norm1 = LayerNorm(d, cfg.layer_norm_eps, "vit_embed", param_dtype, rngs)
        self.norm2 = LayerNorm(d, cfg.layer_norm_eps, "vit_embed", param_dtype, rngs)
        qkv_axes = ("vit_embed", "vit_heads", "head_dim")
        self.q_proj = make_param(rngs, (d, nh, hd), qkv_axes, param_dtype)
        self.k_proj = make_param(rngs, (d, nh, hd), qkv_axes, param_dtype)
        self.v_proj = make_param(rngs, (d, nh, hd), qkv_axes, param_dtype)
        self.q_bias = make_param(rngs, (nh, hd), ("vit_heads", "head_dim"), param_dtype, zeros_init)
        self.k_bias = make_param(rngs, (nh, hd), ("vit_heads", "head_dim"), param_dtype, zeros_init)
        self.v_bias = make_param(rngs, (nh, hd), ("vit_heads", "head_dim"), param_dtype, zeros_init)
        self.o_proj = make_param(rngs, (nh, hd, d), ("vit_heads", "head_dim", "vit_embed"), param_dtype)
        self.o_bias = make_param(rngs, (d,), ("vit_embed",), param_dtype, zeros_init)
        self.fc1 = Dense(d, cfg.intermediate_size, ("vit_embed", "vit_mlp"), param_dtype, rngs, use_bias=True)
        self.fc2 = Dense(cfg.intermediate_size, d, ("vit_mlp", "vit_embed"), param_dtype, rngs, use_bias=True)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array, max_frame_rows: int,
                 attention_impl: str) -> jax.Array:
        dt = x.dtype
        h = self.norm1(x)
        q = jnp.einsum("nd,dhk->nhk", h, self.q_proj[...].astype(dt)) + self.q_bias[...].astype(dt)
        k = jnp.einsum("nd,dhk->nhk", h, self.k_proj[...].astype(dt)) + self.k_bias[...].astype(dt)
        v = jnp.einsum("nd,dhk->nhk", h, self.v_proj[...].astype(dt)) + self.v_bias[...].astype(dt)
        # 2-D rotary in fp32, cast back (spec §2.2)
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(dt)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(dt)
        o = attend(q[None], k[None], v[None], segment_mask(segment_ids[None], max_frame_rows),
                   impl=attention_impl)[0]
        x = x + jnp.einsum("nhk,hkd->nd", o, self.o_proj[...].astype(dt)) + self.o_bias[...].astype(dt)
        h = jax.nn.gelu(self.fc1(self.norm2(x)), approximate=True)  # gelu_pytorch_tanh
        return x + self.fc2(h)


class PatchMerger(nnx.Module):
    """2×2 merge then fc1 → exact GELU → fc2. The final merger normalises each patch (LN(D)) before the
    reshape; the DeepStack mergers normalise the merged 4D vector (spec §2.4)."""

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool, param_dtype: jnp.dtype, rngs: KeySource):
        d4 = cfg.hidden_size * cfg.merge_unit
        self.postshuffle_norm = postshuffle_norm
        self.merge_unit = cfg.merge_unit
        self.norm = LayerNorm(d4 if postshuffle_norm else cfg.hidden_size, cfg.layer_norm_eps,
                              "vit_merged" if postshuffle_norm else "vit_embed", param_dtype, rngs)
        self.fc1 = Dense(d4, d4, ("vit_merged", "vit_merged_out"), param_dtype, rngs, use_bias=True)
        self.fc2 = Dense(d4, cfg.out_hidden_size, ("vit_merged_out", "embed"), param_dtype, rngs, use_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        merged_width = x.shape[-1] * self.merge_unit
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, merged_width))
        else:
            x = self.norm(x).reshape(-1, merged_width)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, config: Qwen3VLConfig, rngs: KeySource):
        cfg = config.vision
        pdt = dtype_of(config.runtime.param_dtype)
        self.cfg = cfg
        self.dtype = dtype_of(config.runtime.dtype)
        self.attention_impl = config.runtime.attention_impl
        self.remat = config.runtime.vision_remat
        self.max_frame_rows = config.runtime.vision_max_frame_rows
        self.patch_embed = Dense(cfg.patch_dim, cfg.hidden_size, ("vit_patch", "vit_embed"), pdt, rngs,
                                 use_bias=True)
        self.pos_embed = make_param(rngs, (cfg.num_position_embeddings, cfg.hidden_size),
                                    ("vit_pos", "vit_embed"), pdt)
        self.blocks = nnx.List([VisionBlock(cfg, pdt, rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, False, pdt, rngs)
        self.deepstack_mergers = nnx.List(
            [PatchMerger(cfg, True, pdt, rngs) for _ in cfg.deepstack_visual_indexes])

    def __call__(self, inputs: VisionInputs) -> tuple[jax.Array, list[jax.Array]]:
        """Returns image embeddings (N/4, H) and one DeepStack feature (N/4, H) per tapped block."""
        x = self.patch_embed(inputs.pixel_values.astype(self.dtype))
        table = self.pos_embed[...].astype(jnp.float32)
        pos = jnp.sum(table[inputs.pos_index] * inputs.pos_weight[..., None], axis=1)  # fp32 (spec §2.1)
        x = x + pos.astype(x.dtype)
        if self.max_frame_rows:  # inputs are checked on the host; a frame past the bound poisons, never misleads
            x = jnp.where(longest_segment(inputs.segment_ids) > self.max_frame_rows, jnp.nan, x)
        cos, sin = vision_cos_sin(inputs.rope_pos, self.cfg.head_dim, self.cfg.rope_theta)
        policy = remat_policy(self.remat)
        deepstack: list[jax.Array] = []
        taps = list(self.cfg.deepstack_visual_indexes)
        for i, block in enumerate(self.blocks):
            x = _run_block(block, x, cos, sin, inputs.segment_ids, self.max_frame_rows, self.attention_impl,
                           policy)
            if i in taps:
                deepstack.append(self.deepstack_mergers[taps.index(i)](x))
        return self.merger(x), deepstack


def _run_block(block: VisionBlock, x, cos, sin, segment_ids, max_frame_rows: int, impl: str, policy) -> jax.Array:
    if policy is None:
        return block(x, cos, sin, segment_ids, max_frame_rows, impl)
    fn = nnx.remat(lambda b, *a: b(*a, max_frame_rows, impl), policy=policy)
    return fn(block, x, cos, sin, segment_ids)
