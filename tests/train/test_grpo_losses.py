"""GRPO loss: every aggregation mode, the clip and dual clip, KL, entropy and truncated IS equal a direct
loop implementation of the spec's formulas (training_and_eval.md §3.3-3.4); micro-batch accumulation and
8-way sharding reproduce the one-batch loss; metrics match numpy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsjax.parallel.mesh import MeshConfig, build_mesh
from gsjax.parallel.sharding import batch_sharding
from gsjax.train.losses import (
    AGG_MODES,
    GRPOLossConfig,
    combine_metric_stats,
    finalize_metrics,
    grpo_policy_loss,
    row_denominators,
    token_entropy,
)

NEEDS_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


# ---------------------------------------------------------------------------------------------- direct reference


def ref_token_loss(logp: float, old: float, adv: float, lo: float, hi: float, c: float | None) -> float:
    """Spec §3.3 for one token, scalar arithmetic."""
    d = min(max(logp - old, -20.0), 20.0)
    rho = math.exp(d)
    l1 = -adv * rho
    l2 = -adv * min(max(rho, 1 - lo), 1 + hi)
    lc = max(l1, l2)
    return min(lc, -c * adv) if (c is not None and adv < 0) else lc


def ref_token_grad(logp: float, old: float, adv: float, lo: float, hi: float, c: float | None) -> float:
    """d loss / d logp for one token: -A·rho where the unclipped branch is active, 0 where a clip binds."""
    rho = math.exp(min(max(logp - old, -20.0), 20.0))
    l1 = -adv * rho
    l2 = -adv * min(max(rho, 1 - lo), 1 + hi)
    if l2 > l1:
        return 0.0
    if c is not None and adv < 0 and l1 > -c * adv:
        return 0.0
    return -adv * rho


def ref_agg(loss: np.ndarray, mask: np.ndarray, mode: str, T: float) -> tuple[float, float]:
    """(value, denominator) of verl's agg_loss on one batch, with loops (spec §3.4 table)."""
    B, L = loss.shape
    if mode == "token-mean":
        num = den = 0.0
        for i in range(B):
            for t in range(L):
                num += mask[i, t] * loss[i, t]
                den += mask[i, t]
        return num / den, den
    if mode == "seq-mean-token-sum-norm":
        num = 0.0
        for i in range(B):
            for t in range(L):
                num += mask[i, t] * loss[i, t]
        return num / T, T
    total, valid = 0.0, 0
    for i in range(B):
        n = sum(mask[i, t] for t in range(L))
        if n == 0:
            continue
        valid += 1
        s = sum(mask[i, t] * loss[i, t] for t in range(L))
        total += s if mode == "seq-mean-token-sum" else s / (n + 1e-8)
    return total / valid, valid


def random_inputs(seed: int = 0, B: int = 8, L: int = 24) -> dict[str, np.ndarray]:
    """Log-ratios up to ±1.6 (so both clips and the dual clip bind), mixed-sign advantages, ragged masks with
    one empty row."""
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.05, 4.0, size=(B, L))
    logp = old + rng.uniform(-1.6, 1.6, size=(B, L))
    adv = rng.normal(size=B)
    adv[0], adv[1] = -1.3, 0.9
    mask = (rng.uniform(size=(B, L)) < 0.7).astype(np.float32)
    mask[2] = 0
    mask[3, :20] = 0
    return {"logp": logp.astype(np.float32), "old": old.astype(np.float32), "adv": adv.astype(np.float32),
            "mask": mask, "ref": (logp + rng.normal(scale=0.3, size=(B, L))).astype(np.float32),
            "rollout": (old + rng.normal(scale=0.4, size=(B, L))).astype(np.float32),
            "entropy": rng.uniform(0.0, 3.0, size=(B, L)).astype(np.float32)}


def token_losses(x: dict[str, np.ndarray], cfg: GRPOLossConfig) -> np.ndarray:
    B, L = x["logp"].shape
    out = np.zeros((B, L))
    for i in range(B):
        for t in range(L):
            out[i, t] = ref_token_loss(float(x["logp"][i, t]), float(x["old"][i, t]), float(x["adv"][i]),
                                       cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c)
    return out


def run(x: dict[str, np.ndarray], cfg: GRPOLossConfig, **extra):
    return grpo_policy_loss(jnp.asarray(x["logp"]), jnp.asarray(x["old"]), jnp.asarray(x["adv"]),
                            jnp.asarray(x["mask"]), cfg, **extra)


# ---------------------------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("mode", AGG_MODES)
def test_each_aggregation_mode_equals_the_direct_formula(mode):
    x = random_inputs(1)
    cfg = GRPOLossConfig(loss_agg_mode=mode, norm_length=64)
    num, den, _ = run(x, cfg)
    expected, expected_den = ref_agg(token_losses(x, cfg), x["mask"], mode, cfg.norm_length)
    assert float(den) == pytest.approx(expected_den)
    assert float(num) / float(den) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_seq_denominator_preset_divides_by_the_fixed_row_count():
    x = random_inputs(2)
    cfg = GRPOLossConfig.upstream_compat(prompts_per_step=2, group_size=6)
    num, den, _ = run(x, cfg)
    loss = token_losses(x, cfg)
    direct = sum(float(np.sum(x["mask"][i] * loss[i])) for i in range(loss.shape[0])) / 12
    assert float(den) == 12 and float(num) / float(den) == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("dual", [3.0, None])
def test_clipping_and_dual_clip_per_token_and_gradient(dual):
    x = random_inputs(3)
    cfg = GRPOLossConfig(loss_agg_mode="token-mean", clip_ratio_c=dual)
    mask = x["mask"]
    expected = token_losses(x, cfg)
    B, L = expected.shape
    one = jnp.ones((1, 1))
    per_token = jax.vmap(lambda lp, o, a: grpo_policy_loss(lp[None, None], o[None, None], a[None], one, cfg)[0])
    got = per_token(jnp.asarray(x["logp"].ravel()), jnp.asarray(x["old"].ravel()), jnp.asarray(np.repeat(x["adv"], L)))
    np.testing.assert_allclose(np.asarray(got).reshape(B, L), expected, rtol=1e-5, atol=1e-6)
    num, den, stats = run(x, cfg)
    assert float(num) / float(den) == pytest.approx(expected[mask > 0].mean(), rel=1e-5)

    grad = np.asarray(jax.grad(lambda lp: run(x | {"logp": lp}, cfg)[0])(jnp.asarray(x["logp"])))
    ref = np.zeros((B, L))
    for i in range(B):
        for t in range(L):
            ref[i, t] = mask[i, t] * ref_token_grad(float(x["logp"][i, t]), float(x["old"][i, t]), float(x["adv"][i]),
                                                    cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c)
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-6)
    # the random inputs do exercise both clips (and, with dual clip on, the lower bound)
    assert 0 < float(stats["pg_clipfrac_sum"]) < B * L
    assert (float(stats["pg_clipfrac_lower_sum"]) > 0) == (dual is not None)


def test_metrics_equal_numpy():
    x = random_inputs(4)
    cfg = GRPOLossConfig(loss_agg_mode="token-mean")
    _, _, stats = run(x, cfg, rollout_logprobs=jnp.asarray(x["rollout"]))
    m = finalize_metrics(stats)
    on = x["mask"] > 0
    d = np.clip(x["logp"] - x["old"], -20, 20)
    rho = np.exp(d)
    adv = np.broadcast_to(x["adv"][:, None], d.shape)
    l1, l2 = -adv * rho, -adv * np.clip(rho, 0.8, 1.28)
    lc = np.maximum(l1, l2)
    assert m["pg_clipfrac"] == pytest.approx((l2 > l1)[on].mean(), rel=1e-6)
    assert m["pg_clipfrac_lower"] == pytest.approx(((lc > -3 * adv) & (adv < 0))[on].mean(), rel=1e-6)
    assert m["ppo_kl"] == pytest.approx((-d)[on].mean(), rel=1e-5)
    assert m["ratio_max"] == pytest.approx(rho[on].max(), rel=1e-6)
    delta = (x["logp"] - x["rollout"])[on]
    assert m["rollout_mismatch/abs_mean"] == pytest.approx(np.abs(delta).mean(), rel=1e-5)
    assert m["rollout_mismatch/abs_max"] == pytest.approx(np.abs(delta).max(), rel=1e-6)
    assert m["rollout_mismatch/mean"] == pytest.approx(delta.mean(), rel=1e-4, abs=1e-6)
    assert m["rollout_mismatch/corr"] == pytest.approx(np.corrcoef(x["logp"][on], x["rollout"][on])[0, 1], abs=1e-4)
    assert m["tokens"] == on.sum()


@pytest.mark.parametrize("kl_type", ["k1", "k3", "low_var_kl"])
def test_kl_and_entropy_terms_join_the_aggregate(kl_type):
    x = random_inputs(5)
    cfg = GRPOLossConfig(loss_agg_mode="seq-mean-token-mean", kl_coef=0.05, kl_type=kl_type, entropy_coef=0.01)
    num, den, stats = run(x, cfg, ref_logprobs=jnp.asarray(x["ref"]), entropy=jnp.asarray(x["entropy"]))
    B, L = x["logp"].shape
    kl = np.zeros((B, L))
    for i in range(B):
        for t in range(L):
            lp, ref = float(x["logp"][i, t]), float(x["ref"][i, t])
            if kl_type == "k1":
                kl[i, t] = lp - ref
            else:
                z = min(max(ref - lp, -20.0), 20.0)
                kl[i, t] = min(max(math.exp(z) - z - 1, -10.0), 10.0)
    total = token_losses(x, cfg) + 0.05 * kl - 0.01 * x["entropy"]
    expected, _ = ref_agg(total, x["mask"], "seq-mean-token-mean", 0)
    assert float(num) / float(den) == pytest.approx(expected, rel=1e-5)
    on = x["mask"] > 0
    assert finalize_metrics(stats)["kl"] == pytest.approx(kl[on].mean(), rel=1e-5)
    assert finalize_metrics(stats)["entropy"] == pytest.approx(x["entropy"][on].mean(), rel=1e-5)


def test_truncated_importance_sampling_weights_the_policy_term():
    x = random_inputs(6)
    cfg = GRPOLossConfig(loss_agg_mode="seq-mean-token-sum", tis_cap=2.0)
    num, den, stats = run(x, cfg, rollout_logprobs=jnp.asarray(x["rollout"]))
    loss = token_losses(x, cfg)
    w = np.minimum(np.exp(np.clip(x["old"] - x["rollout"], -20, 20)), 2.0)
    expected, _ = ref_agg(loss * w, x["mask"], "seq-mean-token-sum", 0)
    assert float(num) / float(den) == pytest.approx(expected, rel=1e-5)
    assert float(stats["tis_capped_sum"]) > 0
    with pytest.raises(ValueError, match="rollout_logprobs"):
        run(x, cfg)


def test_entropy_of_logits():
    logits = np.random.default_rng(0).normal(size=(3, 5, 11)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(token_entropy(jnp.asarray(logits))), -(p * np.log(p)).sum(-1), rtol=1e-5)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        GRPOLossConfig(loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        GRPOLossConfig(clip_ratio_c=0.5)
    defaults = GRPOLossConfig()
    assert (defaults.clip_ratio_low, defaults.clip_ratio_high, defaults.clip_ratio_c) == (0.2, 0.28, 3.0)
    assert defaults.loss_agg_mode == "seq-mean-token-sum" and defaults.kl_coef == 0 and defaults.tis_cap is None


# ---------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("fixed", [None, 12.0])
def test_micro_batch_accumulation_equals_one_batch(mode, fixed):
    """Σ numerators / Σ row-denominator shares over any split = the loss of the whole mini-batch."""
    x = random_inputs(7, B=10)
    cfg = GRPOLossConfig(loss_agg_mode=mode, norm_length=96, seq_denominator=fixed)
    shares = row_denominators(x["mask"].sum(axis=1), cfg)
    full_num, full_den, full_stats = run(x, cfg)
    nums, dens, stats = [], [], []
    for rows in (np.arange(0, 3), np.arange(3, 4), np.arange(4, 10)):
        part = {k: v[rows] for k, v in x.items()}
        n, d, s = run(part, cfg, row_denominator=jnp.asarray(shares[rows]))
        nums.append(float(n))
        dens.append(float(d))
        stats.append(s)
    assert sum(dens) == pytest.approx(float(full_den), rel=1e-6)
    assert sum(nums) / sum(dens) == pytest.approx(float(full_num) / float(full_den), rel=1e-5)
    merged, whole = finalize_metrics(combine_metric_stats(stats)), finalize_metrics(full_stats)
    for key in ("pg_clipfrac", "ppo_kl", "ratio_max", "tokens", "loss"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-5)


def test_empty_minibatch_contributes_nothing():
    x = random_inputs(8)
    x["mask"][:] = 0
    for mode in ("token-mean", "seq-mean-token-sum"):
        num, den, _ = run(x, GRPOLossConfig(loss_agg_mode=mode))
        assert float(num) == 0 and float(den) == 0


# ---------------------------------------------------------------------------------------------- sharding


@NEEDS_8
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_sharded_loss_equals_single_device(mode):
    x = random_inputs(9, B=16, L=32)
    cfg = GRPOLossConfig(loss_agg_mode=mode, kl_coef=0.01, tis_cap=2.0)
    names = ("logp", "old", "adv", "mask", "ref", "rollout")

    def loss(logp, old, adv, mask, ref, rollout):
        return grpo_policy_loss(logp, old, adv, mask, cfg, ref_logprobs=ref, rollout_logprobs=rollout)

    single = jax.jit(loss)(*(jnp.asarray(x[k]) for k in names))
    mesh = build_mesh(MeshConfig(data=2, fsdp=-1))
    placed = [jax.device_put(x[k], batch_sharding(mesh, x[k].ndim)) for k in names]
    assert len(placed[0].sharding.device_set) == 8
    sharded = jax.jit(loss)(*placed)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-6)
    grad_single = jax.jit(jax.grad(lambda lp, *r: loss(lp, *r)[0]))(*(jnp.asarray(x[k]) for k in names))
    grad_sharded = jax.jit(jax.grad(lambda lp, *r: loss(lp, *r)[0]))(*placed)
    np.testing.assert_allclose(np.asarray(grad_single), np.asarray(grad_sharded), rtol=1e-6, atol=1e-7)

