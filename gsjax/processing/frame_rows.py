"""The most patch rows one image frame can reach under a pixel budget: the bound `vision_max_frame_rows` needs.

The banded vision attention is only exact when no frame is larger than its bound, and a bound set too high
wastes the band. Smart-resize rounds each side to a multiple of 32, so a frame can exceed max_pixels / 16²
(thin images round up, small ones grow past min_pixels), and guessing the bound by hand is error-prone. Here it
is computed by pushing every reachable image size through `images.smart_resize_many`, the array form of the
processor's smart-resize (tests/test_frame_rows.py).

Reachable sizes: for SFT, LLaMA-Factory's pre-shrink leaves every image at most `max_pixels` (sides truncated
after scaling), so every (h, w) with h·w <= max_pixels. For the agent, any download is first smart-resized to
the policy view's (min, max) pixel range, so the views are multiples of 32 of area <= max, what its shrink
branch makes of large images (a function of the aspect ratio alone), or what its growth branch makes of small
ones.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from .images import MAX_ASPECT_RATIO, ImageProcessorConfig, smart_resize_many

_PAIRS_PER_CHUNK = 1 << 22


def _sizes_up_to(area: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every (h, w) with h·w <= area, in chunks of about _PAIRS_PER_CHUNK pairs."""
    start = 1
    while start <= area:
        stop = start
        count = 0
        while stop <= area and count < _PAIRS_PER_CHUNK:
            count += area // stop
            stop += 1
        heights = np.arange(start, stop)
        widths_per_height = area // heights
        h = np.repeat(heights, widths_per_height)
        offsets = np.repeat(np.cumsum(widths_per_height) - widths_per_height, widths_per_height)
        w = np.arange(h.size) - offsets + 1
        yield h, w
        start = stop


def _largest_rows(h: np.ndarray, w: np.ndarray, cfg: ImageProcessorConfig) -> int:
    h_bar, w_bar, ok = smart_resize_many(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    rows = (h_bar // cfg.patch_size) * (w_bar // cfg.patch_size)
    return int(rows[ok].max(initial=0))


@functools.cache  # pure; a run resolves its model config more than once
def largest_sft_frame(max_pixels: int, cfg: ImageProcessorConfig) -> int:
    """Patch rows (grid h·w) of the largest frame an SFT image pre-shrunk to <= `max_pixels` can become."""
    return max(_largest_rows(h, w, cfg) for h, w in _sizes_up_to(int(max_pixels)))


def _shrink_outputs(max_pixels: int, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Upper bounds of what smart-resize's shrink branch makes of arbitrarily large images.

    There h_bar = max(f, floor(sqrt(max·r) / f)·f) and w_bar = max(f, floor(sqrt(max / r) / f)·f) depend only
    on the aspect ratio r = h / w (in [1/200, 200], rationals reaching every real in it as images grow). On
    [r_k, r_k+1), r_k = (k·f)² / max, h_bar is constant and w_bar falls, so the largest frames sit at each r_k
    (h_bar = k·f, w_bar = max / (k·f) rounded down to f) and at r = 1/200, in exact integer arithmetic. Where a
    side would round to 0 it is clamped to f: that is how a thin image's view exceeds max_pixels."""
    largest_k = int(np.floor(np.sqrt(max_pixels * MAX_ASPECT_RATIO) / f))
    k = np.arange(1, largest_k + 1, dtype=np.int64)
    k = k[(k * f) ** 2 * MAX_ASPECT_RATIO >= max_pixels]  # r_k >= 1/200
    h = k * f
    w = np.maximum(f, max_pixels // (k * f * f) * f)
    thin_h = max(f, int(np.floor(np.sqrt(max_pixels / MAX_ASPECT_RATIO) / f)) * f)
    thin_w = max(f, int(np.floor(np.sqrt(max_pixels * MAX_ASPECT_RATIO) / f)) * f)
    h = np.concatenate([h, [thin_h]])
    w = np.concatenate([w, [thin_w]])
    return np.concatenate([h, w]), np.concatenate([w, h])


@functools.cache
def largest_agent_frame(view_min_pixels: int, view_max_pixels: int, cfg: ImageProcessorConfig) -> int:
    """Patch rows of the largest frame of a policy view (`agent.images.policy_view`: smart-resize of any image
    to [view_min_pixels, view_max_pixels] in multiples of `cfg.factor`), after the processor's own resize."""
    f = cfg.factor
    # the round branch: multiples of f with area <= view_max (those it would push past view_max are shrunk)
    cells = view_max_pixels // (f * f)
    best = max((_largest_rows(a * f, b * f, cfg) for a, b in _sizes_up_to(cells)), default=0)
    best = max(best, _largest_rows(*_shrink_outputs(view_max_pixels, f), cfg))
    # the growth branch: images whose rounded area is below view_min. Each side rounds to at least 2/3 of itself
    # from 16 pixels up (and to 0 below, where the other side is at most 200 x 15 pixels), so their raw area is
    # below 2.25 x view_min or 45000: all of them are enumerated.
    small = max(int(2.25 * view_min_pixels) + 1, 15 * 15 * MAX_ASPECT_RATIO)
    for h, w in _sizes_up_to(small):
        vh, vw, ok = smart_resize_many(h, w, f, view_min_pixels, view_max_pixels)
        grown = ok & (np.round(h / f) * np.round(w / f) * f * f < view_min_pixels)
        if grown.any():
            best = max(best, _largest_rows(vh[grown], vw[grown], cfg))
    return best
