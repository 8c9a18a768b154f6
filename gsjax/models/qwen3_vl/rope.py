"""Rotary embeddings (interleaved M-RoPE for text, 2-D axial for vision) and the position-id algorithm.

Pure functions. Position ids depend on the token stream and image grids, which are host data, so
`get_rope_index` is numpy and runs in the input pipeline; the cos/sin tables are computed on device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np


def inv_freq(dim: int, theta: float) -> np.ndarray:
    """1/θ^(2k/dim) for k < dim/2, in fp32 exactly as HF evaluates it (spec §3.2)."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def mrope_axis_of_channel(head_dim: int, section: Sequence[int]) -> np.ndarray:
    """Which position axis (0=t, 1=h, 2=w) each of the head_dim/2 frequency channels reads (interleaved)."""
    j = np.arange(head_dim // 2)
    axis = np.zeros_like(j)
    axis[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return axis


def mrope_cos_sin(
    positions: jnp.ndarray, head_dim: int, theta: float, section: Sequence[int], dtype: jnp.dtype
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin of shape (B, L, head_dim) from (3, B, L) positions, cast to the activation dtype like HF."""
    inv = jnp.asarray(inv_freq(head_dim, theta))
    axis = mrope_axis_of_channel(head_dim, section)
    pos = positions.astype(jnp.float32)[axis]  # (hd/2, B, L): channel j takes its axis's position
    freqs = jnp.moveaxis(pos, 0, -1) * inv  # (B, L, hd/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def vision_cos_sin(rope_pos: jnp.ndarray, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """fp32 cos/sin (N, head_dim) for 2-D axial rotary from (N, 2) (row, col) patch positions."""
    inv = jnp.asarray(inv_freq(head_dim // 2, theta))  # head_dim/4 frequencies
    freqs = rope_pos.astype(jnp.float32)[:, :, None] * inv  # (N, 2, hd/4)
    f = freqs.reshape(freqs.shape[0], -1)  # [h freqs | w freqs]
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """NeoX rotate-half rotary on (..., L, heads, hd) with cos/sin (..., L, hd) broadcast over heads."""
    return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


# ------------------------------------------------------------------ position ids
def _frame_grids(image_grid_thw: np.ndarray | None, video_grid_thw: np.ndarray | None
                 ) -> tuple[Iterator[tuple[int, int, int]], Iterator[tuple[int, int, int]]]:
    """One iterator per modality; videos are split into t single-frame grids (each frame has its own
    vision_start/end in the template)."""
    images = [tuple(int(v) for v in g) for g in (image_grid_thw if image_grid_thw is not None else [])]
    frames = [(1, int(h), int(w)) for t, h, w in (video_grid_thw if video_grid_thw is not None else [])
              for _ in range(int(t))]
    return iter(images), iter(frames)


def get_rope_index(
    input_ids: np.ndarray,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    mm_token_type_ids: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(3, B, L) M-RoPE positions and per-row decode delta (spec §3.3).

    Text runs advance all three axes together; a vision run of grid (t, h, w) places its merged tokens
    at (cur+ti, cur+hi, cur+wi) and advances cur by max(t, h', w'). Padding gets position 0.
    Grids are consumed in row-major (batch, sequence) order, one iterator per modality.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {ids.shape}")
    batch, length = ids.shape
    if mm_token_type_ids is None:
        types = (ids == image_token_id).astype(np.int64) + 2 * (ids == video_token_id)
    else:
        types = np.asarray(mm_token_type_ids)
    valid = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = dict(zip((1, 2), _frame_grids(image_grid_thw, video_grid_thw)))
    m = spatial_merge_size
    positions = np.zeros((3, batch, length), dtype=np.int32)
    deltas = np.zeros((batch,), dtype=np.int32)
    for b in range(batch):
        keep = np.flatnonzero(valid[b])
        row_types = types[b, keep]
        out = np.zeros((3, keep.size), dtype=np.int64)
        cur, i = 0, 0
        while i < keep.size:
            j = i
            while j < keep.size and row_types[j] == row_types[i]:
                j += 1
            kind = int(row_types[i])
            if kind == 0:
                out[:, i:j] = cur + np.arange(j - i)
                cur += j - i
            else:
                cur = _place_vision_run(out, i, j, cur, grids[kind], m, b, kind)
            i = j
        positions[:, b, keep] = out
        deltas[b] = (out.max() + 1 - keep.size) if keep.size else 0
    return positions, deltas


def _place_vision_run(out: np.ndarray, start: int, stop: int, cur: int,
                      grids: Iterator[tuple[int, int, int]], m: int, row: int, kind: int) -> int:
    """Fill positions for one run of vision tokens, consuming as many grids as the run covers."""
    name = "image" if kind == 1 else "video"
    pos = start
    while pos < stop:
        try:
            t, h, w = next(grids)
        except StopIteration:
            raise ValueError(
                f"row {row}: more {name} placeholder tokens than {name}_grid_thw entries provide"
            ) from None
        hh, ww = h // m, w // m
        count = t * hh * ww
        if pos + count > stop:
            raise ValueError(
                f"row {row}: a run of {stop - start} {name} tokens does not match the grids "
                f"(a grid ({t},{h},{w}) needs {count} tokens from offset {pos - start})"
            )
        ti, hi, wi = np.meshgrid(np.arange(t), np.arange(hh), np.arange(ww), indexing="ij")
        out[0, pos:pos + count] = cur + ti.ravel()
        out[1, pos:pos + count] = cur + hi.ravel()
        out[2, pos:pos + count] = cur + wi.ravel()
        cur += max(t, hh, ww)
        pos += count
    return cur

