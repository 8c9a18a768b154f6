"""Activation memory of one SFT train step, per device, as pure arithmetic on per-device tensor sizes.

The model counts the tensors XLA keeps alive at the step's peak, which is where the backward pass starts
(the loss gradient meets the LM head) while every layer's saved residuals are still held:

* per decoder layer, multiples of a token-row of each width (hidden, MLP, q projection), the attention
  score matrices (fp32 scores plus probabilities in the compute dtype) and the layer's weights as FSDP
  gathered them (the backward reuses the forward's gathered copy when nothing is rematerialised);
* the head: fp32 logits and their gradient, and the gathered vocab tables (LM head, its full gradient
  before the reduce-scatter, the embedding gradient's scatter target);
* the dense attention mask (xla kernel), the M-RoPE cos/sin tables and a small fixed workspace.

The counts (`NONE_COUNTS`, `HEAD_LOGIT_ROWS`, `HEAD_TABLES`, ...) were read off XLA:CPU's buffer
assignment at the peak (fp32, 2-4 layers, hidden 512-768, three layouts), rounded, and checked against
`memory_analysis()` (tests/bench/test_calibration.py); one set of counts serves every config. They describe
XLA:CPU's fusion in fp32: XLA:CPU upcasts bf16 matmuls to fp32, so bf16 and MoE counts are unverified
here, and GPU fusion may keep a tensor more or less per layer.

Remat changes what the forward keeps, and *when* recomputation is scheduled decides the peak:
"lazy" recomputes each layer just before its backward (GPU/TPU schedulers), so the peak holds every
layer's saved residuals plus one layer's recomputed working set; "eager" is what XLA:CPU's list scheduler
does, hoisting all recomputation to the start of the backward, so remat saves almost nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Recompute = Literal["lazy", "eager"]
MIB = 2**20


@dataclass(frozen=True)
class TokenCounts:
    """How many tensors of each kind one decoder layer holds, in units of one per-device token row."""

    hidden: float = 0.0  # (T, H)
    inter: float = 0.0  # (T, MLP width on this device); for MoE layers (T·k, expert MLP width)
    q: float = 0.0  # (T, query heads × head_dim on this device)
    kv: float = 0.0  # (T, kv heads × head_dim on this device)
    scores: float = 0.0  # attention score matrices (fp32 scores + compute-dtype probabilities = 1)
    score_logits: float = 0.0  # q·kᵀ saved in the compute dtype (the "dots" policy)
    weights: float = 0.0  # the layer's FSDP-gathered weights
    routed: float = 0.0  # MoE: (T·k, H) token copies sorted by expert
    router: float = 0.0  # MoE: (T, E) fp32 router probabilities

    def minus(self, other: TokenCounts) -> TokenCounts:
        """Component-wise difference, floored at zero (a recomputed set cannot be negative)."""
        return TokenCounts(**{k: max(getattr(self, k) - getattr(other, k), 0.0) for k in self.__dataclass_fields__})

    def plus(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(**{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__})


# Everything a layer's backward needs when nothing is rematerialised (read off XLA's peak live set).
NONE_COUNTS = TokenCounts(hidden=7, inter=5, q=2, scores=2, weights=1)
MOE_EXTRA = TokenCounts(routed=3, router=2)  # on top of NONE_COUNTS's inter rows, which become (T·k, I_moe)
# What each remat policy saves from the forward (jax.checkpoint_policies; the model tags no names, so
# "save_qkv_out" saves what "full" does).
SAVED_BY_POLICY: dict[str, TokenCounts] = {
    "full": TokenCounts(hidden=1),
    "save_qkv_out": TokenCounts(hidden=1),
    "dots_no_batch": TokenCounts(hidden=3, q=1, kv=2, inter=2),
    "dots": TokenCounts(hidden=3, q=2, kv=2, inter=2, score_logits=1),
}
# Under eager recomputation remat still drops one MLP-width row per layer; with tensor parallelism the
# MLP's recomputation waits behind the attention output's all-reduce and so runs layer by layer
# (both read off XLA:CPU's peak live sets).
EAGER_REMAT_SAVING = TokenCounts(inter=1)
EAGER_DEFERRED_WITH_TP = TokenCounts(inter=NONE_COUNTS.inter)
HEAD_LOGIT_ROWS = 2.0  # fp32 (T, V) logits and their gradient
HEAD_TABLES = 2.5  # gathered (V, H) tables: LM head, its full gradient, the embedding-gradient target (part)
CHUNKED_HEAD_EXTRA_TABLES = 1.5  # chunked loss: the head gradient carried through the scan + one block's partial
MASK_BYTES_PER_ELEMENT = 4  # the dense causal mask as an additive fp32 bias, xla kernel only
WORKSPACE_BYTES = 2 * MIB  # ids, targets, positions, reductions, small fusions


@dataclass(frozen=True)
class LocalDims:
    """Per-device sizes of one train step's tensors (after batch, tensor and expert sharding)."""

    tokens: int  # batch rows × sequence length on this device
    seq: int
    hidden: int
    inter: int  # dense MLP width on this device
    q_width: int  # query heads × head_dim on this device
    kv_width: int
    heads: int  # query heads on this device
    head_dim: int
    vocab: int  # vocab entries on this device (logits)
    keys_per_query: float  # average keys each query's scores cover (0 for flash kernels)
    score_fp32_only: bool  # flash kernels keep only an fp32 log-sum-exp per query and head
    mask_elements: int  # dense mask elements (xla kernel), 0 otherwise
    act_bytes: int  # compute dtype
    tensor: int = 1  # tensor-parallel degree
    moe_topk: int = 0
    moe_inter: int = 0  # expert MLP width on this device
    num_experts: int = 0
    logit_tokens: int = 0  # positions whose fp32 logits are live at once (tokens, or rows × logits_chunk)


@dataclass(frozen=True)
class ActivationBytes:
    """Per-device activation bytes at the peak, by origin."""

    layers: int  # saved residuals and (re)computed intermediates of the decoder layers
    gathered_weights: int  # FSDP-gathered layer weights held at the peak
    head: int  # logits, their gradient and the gathered vocab tables
    other: int  # mask, rope tables, workspace

    @property
    def total(self) -> int:
        return self.layers + self.gathered_weights + self.head + self.other


def row_bytes(counts: TokenCounts, d: LocalDims, moe: bool) -> float:
    """Bytes of one layer's tensors, weights excluded."""
    t, a = d.tokens, d.act_bytes
    inter_rows = t * d.moe_topk * d.moe_inter if moe else t * d.inter
    score_elems = t * d.heads * d.keys_per_query
    score_bytes = t * d.heads * 4 if d.score_fp32_only else score_elems * (4 + a) / 2
    return (counts.hidden * t * d.hidden * a + counts.inter * inter_rows * a + counts.q * t * d.q_width * a
            + counts.kv * t * d.kv_width * a + counts.scores * score_bytes
            + counts.score_logits * score_elems * a
            + counts.routed * t * d.moe_topk * d.hidden * a + counts.router * t * d.num_experts * 4)


def decoder_bytes(policies: list[str], moe_layers: list[bool], d: LocalDims, gathered_layer: dict[str, float],
                  recompute: Recompute) -> tuple[int, int]:
    """(activation bytes, gathered-weight bytes) of all decoder layers at the peak.

    `gathered_layer` holds one layer's gathered weights per kind, already in the compute dtype.
    """
    rows = 0.0
    weights = 0.0
    transient_rows = 0.0
    transient_weights = 0.0
    for policy, moe in zip(policies, moe_layers):
        full = NONE_COUNTS.plus(MOE_EXTRA) if moe else NONE_COUNTS
        w = gathered_layer["moe" if moe else "dense"]
        if policy == "none":
            rows += row_bytes(full, d, moe)
            weights += w
        elif recompute == "eager":
            deferred = EAGER_DEFERRED_WITH_TP if d.tensor > 1 else EAGER_REMAT_SAVING
            rows += row_bytes(full.minus(deferred), d, moe)
            weights += w
            if d.tensor > 1:
                transient_rows = max(transient_rows, row_bytes(deferred, d, moe))
        else:
            saved = SAVED_BY_POLICY[policy]
            rows += row_bytes(saved, d, moe)
            transient_rows = max(transient_rows, row_bytes(full.minus(saved), d, moe))
            transient_weights = max(transient_weights, w)
    return int(rows + transient_rows), int(weights + transient_weights)


def head_bytes(d: LocalDims, vocab_table_bytes: float) -> int:
    """Loss and LM-head working set: fp32 logits rows and the gathered vocab tables (compute dtype)."""
    chunked = 0 < d.logit_tokens < d.tokens
    tables = HEAD_TABLES + (CHUNKED_HEAD_EXTRA_TABLES if chunked else 0.0)
    return int(HEAD_LOGIT_ROWS * (d.logit_tokens or d.tokens) * d.vocab * 4 + tables * vocab_table_bytes)


def other_bytes(d: LocalDims) -> int:
    rope = 2 * d.tokens * d.head_dim * 4
    return int(MASK_BYTES_PER_ELEMENT * d.mask_elements + rope + WORKSPACE_BYTES)


def chunked_keys_per_query(seq: int, chunk: int) -> float:
    """Average keys per query of the blocked causal kernel: block b reads the keys up to its end."""
    if seq <= chunk:
        return float(seq)
    total = sum((stop - start) * stop for start, stop in
                ((s, min(s + chunk, seq)) for s in range(0, seq, chunk)))
    return total / seq


def activation_bytes(policies: list[str], moe_layers: list[bool], d: LocalDims, gathered_layer: dict[str, float],
                     vocab_table_bytes: float, recompute: Recompute) -> ActivationBytes:
    layers, weights = decoder_bytes(policies, moe_layers, d, gathered_layer, recompute)
    return ActivationBytes(layers=layers, gathered_weights=weights, head=head_bytes(d, vocab_table_bytes),
                           other=other_bytes(d))
