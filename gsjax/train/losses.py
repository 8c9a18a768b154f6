"""Losses as pure functions returning (sum, denominator), so that gradient accumulation and data
parallelism reproduce one big batch exactly: total = Σ sums / Σ denominators.

GRPO (spec training_and_eval.md §3.3-3.4): vanilla PPO token loss with asymmetric clipping and dual clip,
optional truncated importance sampling (TIS) against the rollout engine's logprobs, optional KL to a
reference policy and an entropy bonus, aggregated by one of verl's four modes.

Denominators. Each mode is one global (numerator, denominator) pair over a *mini-batch* (the rows of one
optimizer update): token-mean -> masked tokens, seq-mean-token-sum / seq-mean-token-mean -> sequences with
at least one loss token (`|V|`), seq-mean-token-sum-norm -> the constant `norm_length` T. The first two are
additive, so per-micro-batch denominators summed by the learner give the global one. A constant is not
(k micro-batches would sum to k·T), so the caller may pass `row_denominator`: a per-row share of the
mini-batch's denominator, computed on the host over the whole mini-batch by `row_denominators` (the RL
batch builder stores it as `batch["row_denominator"]`). Then the returned denominator is Σ shares of the
rows present, and Σ over any split into micro-batches and shards equals the global denominator
(up to fp32 rounding of the shares for the constant modes).

Metrics are returned as additive sufficient statistics (sums, counts, maxima) so that micro-batches
combine exactly with `combine_metric_stats`; `finalize_metrics` turns them into readable means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from gsjax.models.qwen3_vl.model import LOGITS
from gsjax.parallel.sharding import constrain

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KLType = Literal["k1", "k3", "low_var_kl"]
KL_TYPES: tuple[str, ...] = ("k1", "k3", "low_var_kl")
SEQ_EPS = 1e-8  # verl's seq-mean-token-mean guard


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position, in fp32 (logits may be bf16)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def masked_nll(logprobs: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ masked token NLL, Σ mask): the SFT loss is their ratio, over however many micro-batches."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(-logprobs * mask), jnp.sum(mask)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return masked_nll(token_logprobs(logits, targets), mask)


def chunked_token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """`token_logprobs(hidden @ head, targets)` computed `chunk` positions at a time, each chunk rematerialised
    in the backward pass: peak memory holds one (B, chunk, V) block of logits instead of (B, L, V), which for a
    150k vocabulary is most of an 8B model's activation memory at long sequence lengths."""
    batch, length, width = hidden.shape
    chunk = min(chunk, length)  # a short (e.g. loss-positions-only) input is one block, not padded to `chunk`
    pad = (-length) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    blocks = (length + pad) // chunk
    hidden_blocks = hidden.reshape(batch, blocks, chunk, width).swapaxes(0, 1)
    target_blocks = targets.reshape(batch, blocks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def block_logprobs(h: jax.Array, t: jax.Array) -> jax.Array:
        return token_logprobs(constrain(h @ head, LOGITS), t)

    out = jax.lax.map(lambda ht: block_logprobs(*ht), (hidden_blocks, target_blocks))
    return out.swapaxes(0, 1).reshape(batch, blocks * chunk)[:, :length]


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of the next-token distribution per position, in fp32."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - logz[..., None])
    return logz - jnp.sum(probs * logits, axis=-1)


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GRPOLossConfig:
    """Policy-loss settings; defaults are upstream's run (spec §3.1: clip 0.2/0.28, dual clip 3.0,
    seq-mean-token-sum, no KL, no entropy, no TIS) with gsjax's default denominators (§3.4).

    `norm_length` is T of seq-mean-token-sum-norm (upstream's padded response width, 30000).
    `seq_denominator` replaces `|V|` of the seq-mean modes by a constant (the upstream-compatible preset
    divides by prompts x n = 48). `temperature` divides the logits before log-softmax in `policy_loss_fn`;
    it must match how the rollout engine reported its logprobs (the embedded JAX sampler reports
    temperature-1 logprobs). `tis_cap` turns on token-level truncated importance sampling
    w = min(exp(old - rollout), cap) (verl uses 2.0); it needs rollout logprobs.
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float | None = 3.0
    loss_agg_mode: AggMode = "seq-mean-token-sum"
    norm_length: int = 30_000
    seq_denominator: float | None = None
    kl_coef: float = 0.0
    kl_type: KLType = "low_var_kl"
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    log_ratio_clamp: float = 20.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode {self.loss_agg_mode!r} not in {AGG_MODES}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"kl_type {self.kl_type!r} not in {KL_TYPES}")
        if not (0 <= self.clip_ratio_low < 1 and self.clip_ratio_high >= 0):
            raise ValueError(f"clip ratios must satisfy 0 <= low < 1, high >= 0; got {self.clip_ratio_low}, "
                             f"{self.clip_ratio_high}")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ValueError(f"dual-clip clip_ratio_c must be > 1 (or None), got {self.clip_ratio_c}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be positive (or None), got {self.tis_cap}")
        if self.norm_length <= 0 or (self.seq_denominator is not None and self.seq_denominator <= 0):
            raise ValueError("norm_length and seq_denominator must be positive")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    @classmethod
    def upstream_compat(cls, prompts_per_step: int = 8, group_size: int = 6, **overrides: Any) -> GRPOLossConfig:
        """Upstream's objective: seq-mean-token-sum divided by the fixed prompts x n (spec §3.4)."""
        return cls(seq_denominator=float(prompts_per_step * group_size), **overrides)

    @property
    def constant_denominator(self) -> float | None:
        """The mode's denominator when it does not depend on the batch (then accumulation needs shares)."""
        if self.loss_agg_mode == "seq-mean-token-sum-norm":
            return float(self.norm_length)
        if self.loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
            return self.seq_denominator
        return None


# ---------------------------------------------------------------------------------------------- aggregation


def aggregate(values: jax.Array, mask: jax.Array, mode: str, *, norm_length: float = 30_000,
              seq_denominator: float | None = None,
              row_denominator: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(numerator, denominator) of verl's `agg_loss` mode over (B, L) token values and loss mask.

    Without `row_denominator` the denominator is this call's own (see the module docstring); with it,
    Σ row_denominator, the rows' shares of the mini-batch's global denominator.
    """
    mask = mask.astype(jnp.float32)
    values = values.astype(jnp.float32)
    row_sum = jnp.sum(values * mask, axis=-1)
    row_tokens = jnp.sum(mask, axis=-1)
    if mode == "seq-mean-token-mean":
        numerator = jnp.sum(row_sum / (row_tokens + SEQ_EPS))
    elif mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        numerator = jnp.sum(row_sum)
    else:
        raise ValueError(f"loss_agg_mode {mode!r} not in {AGG_MODES}")
    if row_denominator is not None:
        return numerator, jnp.sum(row_denominator.astype(jnp.float32))
    if mode == "token-mean":
        denominator = jnp.sum(row_tokens)
    elif mode == "seq-mean-token-sum-norm":
        denominator = jnp.asarray(norm_length, jnp.float32)
    elif seq_denominator is not None:
        denominator = jnp.asarray(seq_denominator, jnp.float32)
    else:
        denominator = jnp.sum((row_tokens > 0).astype(jnp.float32))
    return numerator, denominator


def row_denominators(row_tokens: np.ndarray, cfg: GRPOLossConfig, total_rows: int | None = None) -> np.ndarray:
    """Host side: each row's float32 share of the mini-batch's denominator, from its loss-token count.

    token-mean: the row's tokens; seq-mean modes: 1 if it has a loss token (else 0); a constant D
    (norm_length, or seq_denominator): D / rows, spread evenly over `total_rows` (the mini-batch's rows on
    all hosts; default: these rows). Shares sum to the global denominator, so any micro-batch split sums
    back to it. Padding rows added later get 0.
    """
    tokens = np.asarray(row_tokens, np.float64)
    constant = cfg.constant_denominator
    if constant is not None:
        shares = np.full(tokens.shape, constant / max(tokens.size if total_rows is None else total_rows, 1))
    elif cfg.loss_agg_mode == "token-mean":
        shares = tokens
    else:
        shares = (tokens > 0).astype(np.float64)
    return shares.astype(np.float32)


# ---------------------------------------------------------------------------------------------- token terms


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, kl_type: str) -> jax.Array:
    """Per-token KL(π || π_ref) estimate: k1 = logp - ref; k3 / low_var_kl = clamp(e^x - x - 1, ±10),
    x = clamp(ref - logp, ±20) (spec §3.3)."""
    if kl_type == "k1":
        return logprobs - ref_logprobs
    if kl_type in ("k3", "low_var_kl"):
        x = jnp.clip(ref_logprobs - logprobs, -20.0, 20.0)
        return jnp.clip(jnp.exp(x) - x - 1.0, -10.0, 10.0)
    raise ValueError(f"kl_type {kl_type!r} not in {KL_TYPES}")


def clipped_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                        cfg: GRPOLossConfig) -> dict[str, jax.Array]:
    """Per-token vanilla PPO loss with dual clip (spec §3.3), and the indicators its metrics average.

    d = clamp(logp - old, ±20); rho = e^d; L1 = -A rho; L2 = -A clamp(rho, 1-lo, 1+hi); Lc = max(L1, L2);
    L = min(Lc, -c A) where A < 0 (dual clip), else Lc.
    """
    log_ratio = jnp.clip(logprobs - old_logprobs, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * jnp.clip(ratio, 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    clipped = jnp.maximum(loss1, loss2)
    negative = advantages < 0
    if cfg.clip_ratio_c is None:
        loss, lower = clipped, jnp.zeros_like(clipped, dtype=bool)
    else:
        loss3 = -advantages * cfg.clip_ratio_c
        loss = jnp.where(negative, jnp.minimum(clipped, loss3), clipped)
        lower = (clipped > loss3) & negative
    return {"loss": loss, "log_ratio": log_ratio, "ratio": ratio, "clipped": loss2 > loss1, "clipped_lower": lower}


def tis_weights(old_logprobs: jax.Array, rollout_logprobs: jax.Array, cap: float) -> jax.Array:
    """Detached token-level truncated IS weight min(exp(clamp(old - rollout, ±20)), cap)."""
    weight = jnp.minimum(jnp.exp(jnp.clip(old_logprobs - rollout_logprobs, -20.0, 20.0)), cap)
    return jax.lax.stop_gradient(weight)


# ---------------------------------------------------------------------------------------------- metrics


def _masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask > 0, x.astype(jnp.float32), 0.0))


def _masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.max(jnp.where(mask > 0, x.astype(jnp.float32), -jnp.inf), initial=-jnp.inf)


def logprob_mismatch_stats(logprobs: jax.Array, reference: jax.Array, mask: jax.Array,
                           prefix: str = "mismatch") -> dict[str, jax.Array]:
    """Sufficient statistics of the gap between two logprob streams on masked tokens (e.g. trainer vs
    rollout engine): |Δ| sum and max, signed Δ sum, and the moments of the Pearson correlation."""
    x, y = jax.lax.stop_gradient(logprobs).astype(jnp.float32), reference.astype(jnp.float32)
    delta = x - y
    return {f"{prefix}/tokens": _masked_sum(jnp.ones_like(x), mask),
            f"{prefix}/abs_sum": _masked_sum(jnp.abs(delta), mask),
            f"{prefix}/abs_max": _masked_max(jnp.abs(delta), mask),
            f"{prefix}/delta_sum": _masked_sum(delta, mask),
            f"{prefix}/x_sum": _masked_sum(x, mask), f"{prefix}/y_sum": _masked_sum(y, mask),
            f"{prefix}/xx_sum": _masked_sum(x * x, mask), f"{prefix}/yy_sum": _masked_sum(y * y, mask),
            f"{prefix}/xy_sum": _masked_sum(x * y, mask)}


def combine_metric_stats(stats: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Merge the statistics of several micro-batches: sums add, `*_max` keys take the maximum."""
    out: dict[str, float] = {}
    for one in stats:
        for key, value in one.items():
            v = float(np.asarray(value))
            if key not in out:
                out[key] = v
            elif key.endswith("_max"):
                out[key] = max(out[key], v)
            else:
                out[key] += v
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


TOKEN_MEAN_METRICS = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "ratio", "advantage", "pg_loss", "kl", "entropy",
                      "tis_weight", "tis_capped")
"""Statistics `<name>_sum` that `finalize_metrics` divides by the loss-token count."""


def finalize_metrics(stats: Mapping[str, Any]) -> dict[str, float]:
    """Readable metrics from (combined) statistics: the loss, token means, maxima, the mismatch gap."""
    s = {k: float(np.asarray(v)) for k, v in stats.items()}
    tokens = s.get("tokens", 0.0)
    out = {"tokens": tokens, "loss": _ratio(s.get("loss_sum", 0.0), s.get("denominator", 0.0))}
    out.update({name: _ratio(s[f"{name}_sum"], tokens) for name in TOKEN_MEAN_METRICS if f"{name}_sum" in s})
    if "ratio_max" in s:
        out["ratio_max"] = s["ratio_max"] if tokens > 0 else float("nan")
    for prefix in sorted({k.split("/")[0] for k in s if "/" in k}):
        n = s.get(f"{prefix}/tokens", 0.0)
        out[f"{prefix}/abs_mean"] = _ratio(s[f"{prefix}/abs_sum"], n)
        out[f"{prefix}/abs_max"] = s[f"{prefix}/abs_max"] if n > 0 else float("nan")
        out[f"{prefix}/mean"] = _ratio(s[f"{prefix}/delta_sum"], n)
        out[f"{prefix}/corr"] = _pearson(s, prefix, n)
    return out


def _pearson(s: Mapping[str, float], prefix: str, n: float) -> float:
    if n < 2:
        return float("nan")
    mx, my = s[f"{prefix}/x_sum"] / n, s[f"{prefix}/y_sum"] / n
    cov = s[f"{prefix}/xy_sum"] / n - mx * my
    vx, vy = s[f"{prefix}/xx_sum"] / n - mx * mx, s[f"{prefix}/yy_sum"] / n - my * my
    if vx <= 0 or vy <= 0:
        return float("nan")
    return float(np.clip(cov / np.sqrt(vx * vy), -1.0, 1.0))


# ---------------------------------------------------------------------------------------------- the loss


def grpo_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, loss_mask: jax.Array,
                     cfg: GRPOLossConfig, ref_logprobs: jax.Array | None = None,
                     rollout_logprobs: jax.Array | None = None, entropy: jax.Array | None = None,
                     row_denominator: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss numerator, denominator, metric statistics) of the GRPO policy loss on (B, L) token arrays.

    `advantages` is (B,) (broadcast over tokens) or (B, L). `old_logprobs` are the behaviour policy's
    (the rollout engine's, or the trainer's recomputation before the first update): fixed for all
    mini-batches of a step, so the ratio moves after the first update. Per token the total is
    L·w_tis + kl_coef·KL - entropy_coef·H, aggregated once by `cfg.loss_agg_mode` (verl aggregates the
    three terms with the same mode, so this is their sum). The loss is numerator / denominator.
    """
    mask = loss_mask.astype(jnp.float32)
    logprobs = logprobs.astype(jnp.float32)
    old_logprobs = old_logprobs.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)
    if adv.ndim == 1:
        adv = jnp.broadcast_to(adv[:, None], logprobs.shape)
    pg = clipped_policy_loss(logprobs, old_logprobs, adv, cfg)
    token_loss = pg["loss"]
    stats: dict[str, jax.Array] = {
        "tokens": jnp.sum(mask),
        "pg_clipfrac_sum": _masked_sum(pg["clipped"], mask),
        "pg_clipfrac_lower_sum": _masked_sum(pg["clipped_lower"], mask),
        "ppo_kl_sum": _masked_sum(-pg["log_ratio"], mask),
        "ratio_sum": _masked_sum(jax.lax.stop_gradient(pg["ratio"]), mask),
        "ratio_max": _masked_max(jax.lax.stop_gradient(pg["ratio"]), mask),
        "advantage_sum": _masked_sum(adv, mask),
    }
    if cfg.tis_cap is not None:
        if rollout_logprobs is None:
            raise ValueError("tis_cap is set but no rollout_logprobs were given")
        weight = tis_weights(old_logprobs, rollout_logprobs.astype(jnp.float32), cfg.tis_cap)
        token_loss = token_loss * weight
        stats["tis_weight_sum"] = _masked_sum(weight, mask)
        stats["tis_capped_sum"] = _masked_sum(weight >= cfg.tis_cap, mask)
    stats["pg_loss_sum"] = _masked_sum(jax.lax.stop_gradient(token_loss), mask)
    if cfg.kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef is set but no ref_logprobs were given")
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs.astype(jnp.float32), cfg.kl_type)
        stats["kl_sum"] = _masked_sum(jax.lax.stop_gradient(kl), mask)
        if cfg.kl_coef != 0:
            token_loss = token_loss + cfg.kl_coef * kl
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef is set but no entropy was given")
    if entropy is not None:
        stats["entropy_sum"] = _masked_sum(jax.lax.stop_gradient(entropy), mask)
        if cfg.entropy_coef != 0:
            token_loss = token_loss - cfg.entropy_coef * entropy
    if rollout_logprobs is not None:
        stats.update(logprob_mismatch_stats(logprobs, rollout_logprobs, mask, "rollout_mismatch"))
    numerator, denominator = aggregate(token_loss, mask, cfg.loss_agg_mode, norm_length=cfg.norm_length,
                                       seq_denominator=cfg.seq_denominator, row_denominator=row_denominator)
    stats["loss_sum"] = jax.lax.stop_gradient(numerator)
    stats["denominator"] = jax.lax.stop_gradient(denominator)
    return numerator, denominator, stats
