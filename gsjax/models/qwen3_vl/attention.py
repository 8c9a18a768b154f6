"""One attention interface, several kernels, and the masks they consume.

The model builds an `AttentionMask` (causal self-attention, causal attention into a KV cache, or
block-diagonal segments for the vision tower) and calls `attend`; the kernel is picked per backend by
config, so a faster kernel never touches model code (perf-notes.md: on CPU the blocked causal kernel
wins, on GPU cuDNN flash attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

from .blocked_attention import blocked_causal

MaskKind = Literal["causal", "cached", "segments"]


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see.

    causal:   queries and keys are the same sequence; key s visible to query t iff s <= t and valid[s].
    cached:   keys are a cache buffer; key s visible to query t iff s <= q_index[t] and valid[s].
    segments: non-causal; visible iff same segment id (vision tower: one segment per image frame).
    """

    kv_valid: jax.Array | None = None  # (B, S) bool
    q_index: jax.Array | None = None  # (B, T) int32, "cached" only
    # () int32, "cached" only, optional: no query of a row the caller reads attends this far (a sampler's longest
    # live row; idle slots beyond it compute garbage), so the blocked decode kernel stops there
    key_bound: jax.Array | None = None
    segment_ids: jax.Array | None = None  # (B, S) int32, "segments" only
    kind: MaskKind = "causal"  # static
    # static, "segments" only: every segment is contiguous and at most this long (0: unknown). Lets the
    # kernel read a band of keys around each query block instead of all of them.
    max_segment: int = 0

    def dense(self, num_queries: int, num_keys: int) -> jax.Array:
        """Boolean (B, 1, T, S) mask."""
        if self.kind == "segments":
            seg = self.segment_ids
            return (seg[:, :, None] == seg[:, None, :])[:, None]
        if self.kind == "causal":
            q_index = jnp.arange(num_queries)[None, :]
        else:
            q_index = self.q_index
        visible = jnp.arange(num_keys)[None, None, :] <= q_index[:, :, None]
        if self.kv_valid is not None:
            visible = visible & self.kv_valid[:, None, :]
        return visible[:, None]


# `kind` is static pytree metadata (it selects code paths), the arrays are data.
jax.tree_util.register_dataclass(
    AttentionMask, data_fields=["kv_valid", "q_index", "segment_ids", "key_bound"],
    meta_fields=["kind", "max_segment"]
)


def causal_mask(valid: jax.Array | None) -> AttentionMask:
    return AttentionMask(kv_valid=None if valid is None else valid.astype(bool), kind="causal")


def cached_mask(q_index: jax.Array, kv_valid: jax.Array, key_bound: jax.Array | None = None) -> AttentionMask:
    return AttentionMask(kv_valid=kv_valid.astype(bool), q_index=q_index.astype(jnp.int32), kind="cached",
                         key_bound=None if key_bound is None else jnp.asarray(key_bound, jnp.int32))


def segment_mask(segment_ids: jax.Array, max_segment: int = 0) -> AttentionMask:
    """Block-diagonal mask; `max_segment` > 0 promises contiguous segments of at most that many rows."""
    return AttentionMask(segment_ids=segment_ids, kind="segments", max_segment=max_segment)


def resolve_impl(impl: str) -> str:
    """'auto' → cuDNN flash attention on GPU, the blocked causal kernel on CPU, XLA elsewhere."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn"
    if backend == "cpu":
        return "chunked"
    return "xla"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, impl: str = "auto",
           chunk: int = 128) -> jax.Array:
    """softmax(q·kᵀ/√d + mask)·v with fp32 logits and softmax; q (B,T,N,H), k/v (B,S,K,H), N % K == 0."""
    impl = resolve_impl(impl)
    if impl == "cudnn" and mask.kind == "causal" and q.dtype in (jnp.bfloat16, jnp.float16) \
            and q.shape[1] == k.shape[1]:
        return _cudnn_causal(q, k, v, mask)
    if impl == "chunked" and mask.kind == "causal" and q.shape[1] > chunk:
        return _chunked_causal(q, k, v, mask, chunk)
    if mask.kind == "segments" and 0 < mask.max_segment and 3 * mask.max_segment < q.shape[1]:
        return _banded_segments(q, k, v, mask.segment_ids, mask.max_segment)
    dense = mask.dense(q.shape[1], k.shape[1])
    return jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="xla")


def _cudnn_causal(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """cuDNN flash attention (GPU, half precision): causal self-attention over right-padded rows.

    cuDNN takes padding as per-row lengths, not as a key mask (a (B,1,1,S) mask becomes a bias it refuses), so
    each row's valid keys must be a prefix, as every batch and prefill here builds them. A row whose mask is
    not a prefix comes out NaN (caught by the non-finite guards) rather than silently attending wrongly. A
    fully padded row gets length 1, so it stays finite (its outputs are never read).
    """
    if mask.kv_valid is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    valid = mask.kv_valid
    lengths = valid.sum(axis=-1, dtype=jnp.int32)
    prefix = jnp.all(valid == (jnp.arange(valid.shape[1])[None, :] < lengths[:, None]), axis=-1)
    lengths = jnp.maximum(lengths, 1)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation="cudnn")
    return jnp.where(prefix[:, None, None, None], out, jnp.nan).astype(out.dtype)


def _chunked_causal(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, chunk: int) -> jax.Array:
    """Causal attention in query blocks that only read the keys at or before the block's end.

    Skips the fully masked upper triangle (about half the work at long lengths) with static slices; the exact
    softmax is kept per block, and the backward recomputes each block's scores (blocked_attention.py).
    """
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    q_grouped = (q.astype(jnp.float32) / jnp.sqrt(jnp.float32(dim))).reshape(
        batch, length, kv_heads, heads // kv_heads, dim).transpose(0, 2, 3, 1, 4)
    k_heads, v_heads = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (k, v))
    out = blocked_causal(q_grouped, k_heads, v_heads, mask.kv_valid, chunk)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim).astype(q.dtype)


def _banded_segments(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int) -> jax.Array:
    """Block-diagonal attention over contiguous segments of at most `block` rows, in O(N·block) not O(N²).

    Query block i (rows [i·block, (i+1)·block)) can only see keys of its own segments, which all lie within
    [(i-1)·block, (i+2)·block): so each block attends over that static band of 3·block keys with the segment
    mask inside it. Every visible key is in the band, so the softmax is the dense one. Rows padded on to fill
    the blocks and the band's edges get segment id -2 (padding rows of the input keep -1: they only see each
    other, as in the dense kernel, and are never read).
    """
    batch, length, heads, dim = q.shape
    blocks = -(-length // block)
    tail = blocks * block - length
    seg = segment_ids.astype(jnp.int32)

    def pad_rows(x: jax.Array, before: int, after: int, fill: float | int = 0) -> jax.Array:
        widths = [(0, 0)] * x.ndim
        widths[1] = (before, after)
        return jnp.pad(x, widths, constant_values=fill)

    def bands(x: jax.Array) -> jax.Array:
        """(B, (blocks + 2)·block, ...), one block of padding on each side -> (B·blocks, 3·block, ...): each
        block with its two neighbours."""
        tiles = x.reshape(batch, blocks + 2, block, *x.shape[2:])
        band = jnp.concatenate([tiles[:, :-2], tiles[:, 1:-1], tiles[:, 2:]], axis=2)
        return band.reshape(batch * blocks, 3 * block, *x.shape[2:])

    q_blocks = pad_rows(q, 0, tail).reshape(batch * blocks, block, heads, dim)
    q_seg = pad_rows(seg, 0, tail, -2).reshape(batch * blocks, block)
    k_band, v_band = (bands(pad_rows(x, block, tail + block)) for x in (k, v))
    k_seg = bands(pad_rows(seg, block, tail + block, -2))
    mask = (q_seg[:, :, None] == k_seg[:, None, :])[:, None]  # (B·blocks, 1, block, 3·block)
    out = jax.nn.dot_product_attention(q_blocks, k_band, v_band, mask=mask, implementation="xla")
    return out.reshape(batch, blocks * block, heads, dim)[:, :length]


def decode_block(impl: str, chunk: int, cache_length: int) -> int | None:
    """The key block of the blocked decode kernel for a cache this long, or None where it does not apply.

    The blocked kernel (CPU, where `impl` resolves to "chunked") visits only the cache blocks up to the longest
    live row, so a sampler passes it the whole cache and needs no window buckets. It takes blocks of `chunk`
    keys (or the whole cache when shorter) and needs the cache to be a whole number of them.
    """
    block = min(chunk, cache_length)
    return block if resolve_impl(impl) == "chunked" and cache_length % block == 0 else None


def attend_cached(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, impl: str = "auto",
                  chunk: int = 128) -> jax.Array:
    """`attend` over keys/values read from a KV cache, which keeps them head-major: k/v (B, K, S, H).

    A decode step (one query per row) reads that layout directly: in blocks up to the longest live row on CPU
    (`_single_query_blocked`), else over the whole window given (`_single_query`). Several queries (a prefill
    onto a reused prefix) take the keys in (B, S, K, H) as every other kernel does.
    """
    if q.shape[1] == 1 and mask.kind == "cached":
        block = decode_block(impl, chunk, k.shape[2])
        return _single_query(q, k, v, mask) if block is None else _single_query_blocked(q, k, v, mask, block)
    return attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, impl=impl, chunk=chunk)


def _single_query_blocked(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, block: int) -> jax.Array:
    """A decode step over a head-major cache, k/v (B, K, S, H), in blocks of `block` keys with an online softmax.

    A while loop visits only the blocks below `mask.key_bound` (the caller's longest live row; else every row's
    query index), so the step reads the keys that exist,
    not a window bucket of up to 1.5x as many, and each block is read once while it is in the CPU's cache (the
    windowed kernel copied the whole window out first): 3.4x faster per layer with 1056 cached tokens of 16 rows
    (perf-notes model, 2 cores), 8x with 2100. A block with no visible key for a row leaves that row's state bit
    for bit unchanged (its weights underflow to exact zeros and the running max stays), so a row's result does
    not depend on how long the rows decoded beside it are.
    """
    batch, _, heads, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim).astype(k.dtype)
    q_index = mask.q_index[:, 0]
    lowest = jnp.finfo(jnp.float32).min

    def visit(i, carry):
        best, total, acc = carry  # running max (B, K, G), softmax denominator, weighted sum of V (B, K, G, H)
        start = i * block
        keys = jax.lax.dynamic_slice_in_dim(k, start, block, axis=2)
        values = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2)
        visible = ((start + jnp.arange(block))[None, :] <= q_index[:, None]) & jax.lax.dynamic_slice_in_dim(
            mask.kv_valid, start, block, axis=1)
        logits, values = _masked_scores(qg, keys, values, visible)
        new_best = jnp.maximum(best, logits.max(axis=-1))
        weights = jnp.exp(logits - new_best[..., None])
        rescale = jnp.exp(best - new_best)
        acc = acc * rescale[..., None] + jnp.sum(weights[..., None] * values[:, :, None], axis=3)
        return new_best, total * rescale + weights.sum(axis=-1), acc

    shape = (batch, kv_heads, heads // kv_heads)
    init = (jnp.full(shape, lowest), jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, dim), jnp.float32))
    bound = jnp.max(q_index) + 1 if mask.key_bound is None else mask.key_bound
    blocks = (jnp.clip(bound, 1, k.shape[2]) + block - 1) // block
    _, total, acc = jax.lax.fori_loop(0, blocks, visit, init)
    return (acc / total[..., None]).reshape(batch, 1, heads, dim).astype(q.dtype)


def _single_query(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """One new token per row against a head-major cache window, k/v (B, K, S, H): a decode step.

    The logits are one batched matmul over (B, K) that reads each head's keys where they lie (a (B, S, K, H)
    cache needed a transposed copy of the window per layer and step: this op took twice as long at 256 cached
    tokens on CPU, and a batch-16 decode step of the perf-notes model 25 % longer at 256 and 1024);
    the weighted sum of V multiplies and reduces over S in the cache's own layout, so masked keys add exact
    zeros and the result does not depend on how much masked cache the window spans (bit for bit on CPU between
    the sampler's window buckets; a window of an odd width can change the reductions' rounding, ~4e-7).
    """
    batch, _, heads, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim).astype(k.dtype)
    logits, values = _masked_scores(qg, k, v, mask.dense(1, k.shape[2])[:, 0, 0])
    out = jnp.sum(jax.nn.softmax(logits, axis=-1)[..., None] * values[:, :, None, :, :], axis=3)  # (B, K, G, H)
    return out.reshape(batch, 1, heads, dim).astype(q.dtype)


def _masked_scores(qg: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both decode kernels' scores: fp32 logits (B, K, G, S) of grouped queries qg (B, K, G, H) against head-major
    keys k (B, K, S, H), the lowest float where `visible` (B, S) is False; and the values in fp32 with masked
    columns zeroed, so a slot's stale NaN/inf (a diverged earlier request) is never read."""
    logits = jnp.einsum("bkgh,bksh->bkgs", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(qg.shape[-1]))
    logits = jnp.where(visible[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    return logits, jnp.where(visible[:, None, :, None], v.astype(jnp.float32), 0.0)
