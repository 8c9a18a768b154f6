"""RL training batches from exact token records: the batch contract with every image's pixels, the image
check, mini/micro-batching with exact accumulation, and on a tiny Qwen3-VL: trainer logprobs equal the
rollout's only with the images, and the PPO ratio moves after the first mini-batch's update."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsjax.agent.engine_policy import TokenImage, TokenRecord, TurnRecord
from gsjax.data.encode import EncodedExample
from gsjax.models.qwen3_vl.config import Qwen3VLConfig, preset
from gsjax.models.qwen3_vl.model import Qwen3VL
from gsjax.models.qwen3_vl.rope import get_rope_index
from gsjax.train.learner import device_batch
from gsjax.train.losses import (
    GRPOLossConfig,
    finalize_metrics,
    grpo_policy_loss,
    row_denominators,
    token_logprobs,
)
from gsjax.train.model_loss import make_grpo_loss, policy_logprobs
from gsjax.train.rl_batch import (
    OVER_LENGTH,
    ImageTokenMismatch,
    RLBatchConfig,
    RLSample,
    build_rl_batches,
    collate_rl,
    rl_sample,
    split_minibatches,
)

PAD, IM_END, IMG, VS, VE = 255, 190, 200, 202, 203


@pytest.fixture(scope="module")
def cfg() -> Qwen3VLConfig:
    """The tiny preset with a 256-token vocabulary and 3 text layers (one per DeepStack tap), to compile fast."""
    base = preset("tiny")
    text = dataclasses.replace(base.text, vocab_size=256, num_hidden_layers=3)
    return dataclasses.replace(base, text=text, image_token_id=IMG,
                               video_token_id=201, vision_start_token_id=VS, vision_end_token_id=VE)


def make_record(rng: np.random.Generator, grids: list[tuple[int, int, int]], patch_dim: int,
                turns: int | None = None) -> TokenRecord:
    """prompt (mask 0) | sampled turn (mask 1, with logprobs) | observation with one image (mask 0) | ..."""
    record = TokenRecord()
    record.extend(rng.integers(0, 180, size=int(rng.integers(3, 8))), 0)
    for k in range(turns or len(grids) + 1):
        n = int(rng.integers(3, 9))
        prompt_len = len(record)
        record.extend([*rng.integers(0, 180, size=n), IM_END], 1, -rng.uniform(0.01, 3.0, size=n + 1))
        record.turns.append(TurnRecord(k, prompt_len, n + 1, n + 1, "stop", f"v{k}", (f"v{k}",), f"r{k}", 0.0,
                                       False, False))
        if k < len(grids):
            t, h, w = grids[k]
            record.extend([191, 5, VS, *[IMG] * (t * h * w // 4), VE, 6, 7], 0)
            pixels = rng.uniform(-1, 1, size=(t * h * w, patch_dim)).astype(np.float32)
            record.images.append(TokenImage(pixels, (t, h, w), b"", f"sha{k}", f"img{k}.jpg"))
    return record


GRIDS = [[(1, 4, 4)], [], [(1, 4, 6), (1, 4, 4)], [(1, 2, 4)], [(1, 4, 4)]]


@pytest.fixture(scope="module")
def samples(cfg) -> list[RLSample]:
    rng = np.random.default_rng(0)
    records = [make_record(rng, g, cfg.vision.patch_dim) for g in GRIDS]
    return [rl_sample(r, 0.5 - 0.3 * i, cfg, episode_id=f"e{i}", group_id="g") for i, r in enumerate(records)]


def test_batch_contract_carries_exact_tokens_logprobs_and_all_images(cfg, samples):
    length = max(len(s) for s in samples) + 5
    shares = [1.0] * len(samples) + [0.0]
    batch = collate_rl([*samples, None], length, cfg, shares, cfg=RLBatchConfig(pad_id=PAD))
    B = len(samples) + 1
    assert batch["input_ids"].shape == batch["old_logprobs"].shape == (B, length)
    assert batch["positions"].shape == (3, B, length)
    for r, s in enumerate(samples):
        ids, mask, lp = s.example.input_ids, s.example.loss_mask, s.rollout_logprobs
        n = len(ids)
        np.testing.assert_array_equal(batch["input_ids"][r, :n], ids)
        np.testing.assert_array_equal(batch["targets"][r, : n - 1], ids[1:])
        np.testing.assert_array_equal(batch["target_mask"][r, : n - 1], mask[1:])  # t predicts t+1
        assert batch["target_mask"][r, n - 1:].sum() == 0
        # only sampled tokens are trained; image and tool tokens never are
        trained = batch["targets"][r][batch["target_mask"][r] > 0]
        assert not np.isin(trained, [IMG, VS, VE, 191]).any()
        np.testing.assert_array_equal(batch["old_logprobs"][r, : n - 1], np.where(mask[1:] > 0, lp[1:], 0))
        assert batch["advantages"][r] == np.float32(s.advantage) and batch["sample_index"][r] == r
        assert s.weight_versions == tuple(f"v{k}" for k in range(len(GRIDS[r]) + 1))
        pos, _ = get_rope_index(ids[None], image_token_id=IMG, video_token_id=201, spatial_merge_size=2,
                                image_grid_thw=s.example.image_grid_thw)
        np.testing.assert_array_equal(batch["positions"][:, r, :n], pos[:, 0])
    pad_row = B - 1
    assert batch["target_mask"][pad_row].sum() == 0 and batch["advantages"][pad_row] == 0
    assert batch["row_denominator"][pad_row] == 0 and batch["sample_index"][pad_row] == -1
    # the trained batch holds the pixels of every image of every row, in row order
    vision = batch["vision"]
    assert vision is not None
    pixels = np.concatenate([s.example.pixel_values for s in samples if s.example.pixel_values is not None])
    np.testing.assert_array_equal(vision["pixel_values"][: len(pixels)], pixels)
    images = sum(len(g) for g in GRIDS)
    assert len(set(vision["segment_ids"][: len(pixels)].tolist())) == images
    assert np.all(vision["segment_ids"][len(pixels):] == -1)


def test_rows_without_their_images_are_refused(cfg, samples):
    rng = np.random.default_rng(1)
    stripped = make_record(rng, [(1, 4, 4)], cfg.vision.patch_dim)
    stripped.images.clear()
    with pytest.raises(ImageTokenMismatch, match="pad runs"):
        rl_sample(stripped, 1.0, cfg)
    wrong_grid = make_record(rng, [(1, 4, 4)], cfg.vision.patch_dim)
    image = wrong_grid.images[0]
    wrong_grid.images[0] = dataclasses.replace(image, grid_thw=(1, 2, 4))
    with pytest.raises(ImageTokenMismatch):
        rl_sample(wrong_grid, 1.0, cfg)
    s = samples[0]
    no_pixels = dataclasses.replace(s, example=EncodedExample(s.example.input_ids, s.example.loss_mask, None, None))
    with pytest.raises(ImageTokenMismatch):
        collate_rl([no_pixels], 128, cfg)
    with pytest.raises(ValueError, match="non-finite"):
        rl_sample(make_record(rng, [], cfg.vision.patch_dim), float("nan"), cfg)


def _many(cfg, count: int, seed: int) -> list[RLSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        grids = [(1, 2, 4)] * int(rng.integers(0, 3))
        record = make_record(rng, grids, cfg.vision.patch_dim, turns=len(grids) + int(rng.integers(1, 6)))
        out.append(rl_sample(record, float(rng.normal()), cfg, episode_id=f"e{i}"))
    return out


def _current_logprobs(batch: dict) -> np.ndarray:
    """A stand-in for the updated policy: rollout logprobs moved by a fixed function of (sample, position)."""
    t = np.arange(batch["old_logprobs"].shape[1])[None]
    bump = 0.4 * np.sin(batch["sample_index"][:, None] * 7.0 + t)
    return np.where(batch["target_mask"] > 0, batch["old_logprobs"] + bump, 0).astype(np.float32)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_micro_batches_cover_each_row_once_and_accumulate_to_the_minibatch_loss(cfg, mode):
    samples = _many(cfg, 23, seed=2)
    buckets = (32, 64, 128)
    long_record = make_record(np.random.default_rng(3), [], cfg.vision.patch_dim, turns=30)
    samples.append(rl_sample(long_record, 1.0, cfg))
    assert len(samples[-1]) > buckets[-1]
    loss_cfg = GRPOLossConfig(loss_agg_mode=mode, norm_length=128)
    rl_cfg = RLBatchConfig(buckets=buckets, max_tokens_per_device=256, num_minibatches=2, pad_id=PAD)
    built = build_rl_batches(samples, cfg, loss_cfg, rl_cfg, parts=2)
    assert dict(built.excluded.counts) == {OVER_LENGTH: 1} and len(built.minibatches) == 2
    seen: list[int] = []
    shapes = set()
    for minibatch in built.minibatches:
        members = sorted(i for m in minibatch for i in m["sample_index"] if i >= 0)
        seen += members
        nums = dens = 0.0
        for micro in minibatch:
            rows, length = micro["input_ids"].shape
            shapes.add((rows, length))
            assert rows % 2 == 0 and length in buckets and (rows // 2) * length <= 256
            pad = micro["sample_index"] < 0
            assert micro["target_mask"][pad].sum() == 0 and np.all(micro["advantages"][pad] == 0)
            assert np.all(micro["row_denominator"][pad] == 0)
            n, d, _ = grpo_policy_loss(_current_logprobs(micro), micro["old_logprobs"], micro["advantages"],
                                       micro["target_mask"], loss_cfg, row_denominator=micro["row_denominator"])
            nums, dens = nums + float(n), dens + float(d)
        # the same rows as one batch, with the mode's own (global) denominator
        whole = collate_rl([samples[i] for i in members], buckets[-1], cfg, cfg=rl_cfg, sample_index=members)
        n, d, _ = grpo_policy_loss(_current_logprobs(whole), whole["old_logprobs"], whole["advantages"],
                                   whole["target_mask"], loss_cfg)
        assert dens == pytest.approx(float(d), rel=1e-6)
        assert nums / dens == pytest.approx(float(n) / float(d), rel=1e-5)
    assert sorted(seen) == list(range(len(samples) - 1))
    assert len(shapes) <= 6


class _FixedAgreement:
    """Two simulated hosts: the first pass records each host's plan, the second answers with the agreement."""

    def __init__(self, totals: dict[int, list[int]] | None = None, shapes=None):
        self.seen_totals: list[list[int]] = []
        self.seen_shapes = None
        self.fixed_totals, self.fixed_shapes = totals, shapes

    def totals(self, local):
        self.seen_totals.append(list(local))
        return local if self.fixed_totals is None else self.fixed_totals[len(self.seen_totals) - 1]

    def shapes(self, local):
        self.seen_shapes = local
        return local if self.fixed_shapes is None else self.fixed_shapes


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_two_hosts_pad_to_agreed_shapes_and_keep_the_global_minibatch_loss(cfg, mode):
    """Multi-host GRPO: each host batches its own samples (here 15 and 3), padded to shapes both agree on;
    the two hosts' micro-batches of a mini-batch give the loss of that mini-batch built on one host."""
    from gsjax.train.grpo_hosts import agreed_shapes

    samples = _many(cfg, 18, seed=5)
    hosts = [samples[:15], samples[15:]]
    loss_cfg = GRPOLossConfig(loss_agg_mode=mode, norm_length=128)
    rl_cfg = RLBatchConfig(buckets=(32, 64, 128), max_tokens_per_device=256, num_minibatches=2, pad_id=PAD)
    planning = [_FixedAgreement() for _ in hosts]
    for host, agreement in zip(hosts, planning):
        build_rl_batches(host, cfg, loss_cfg, rl_cfg, parts=1, hosts=agreement)
    rounds = len(planning[0].seen_totals)
    totals = {k: list(np.sum([a.seen_totals[k] for a in planning], axis=0)) for k in range(rounds)}
    shapes = agreed_shapes([a.seen_shapes for a in planning])
    built = [build_rl_batches(host, cfg, loss_cfg, rl_cfg, parts=1, hosts=_FixedAgreement(totals, shapes))
             for host in hosts]
    assert len(built[0].minibatches) == len(built[1].minibatches) == 2
    assert len(planning[1].seen_shapes[0]) < len(shapes[0])  # the small host pads with whole micro-batches
    covered = []
    for m in range(2):
        parts = [b.minibatches[m] for b in built]
        assert [x["input_ids"].shape for x in parts[0]] == [x["input_ids"].shape for x in parts[1]]
        assert [None if x["vision"] is None else x["vision"]["segment_ids"].shape for x in parts[0]] == [
            None if x["vision"] is None else x["vision"]["segment_ids"].shape for x in parts[1]]
        for micro in parts[0] + parts[1]:
            assert micro["input_ids"].shape[0] * micro["input_ids"].shape[1] <= 256  # the per-device budget
        nums = dens = 0.0
        members = []
        for host, part in zip(hosts, parts):
            for micro in part:
                rows = [host[i] if i >= 0 else None for i in micro["sample_index"]]
                members += [x for x in rows if x is not None]
                # number rows by their sample in the whole set, so the stand-in policy moves them alike
                micro["sample_index"] = np.asarray([-1 if x is None else samples.index(x) for x in rows], np.int32)
                n, d, _ = grpo_policy_loss(_current_logprobs(micro), micro["old_logprobs"], micro["advantages"],
                                           micro["target_mask"], loss_cfg, row_denominator=micro["row_denominator"])
                nums, dens = nums + float(n), dens + float(d)
        covered += members
        whole = collate_rl(members, 128, cfg, cfg=rl_cfg, sample_index=[samples.index(x) for x in members])
        n, d, _ = grpo_policy_loss(_current_logprobs(whole), whole["old_logprobs"], whole["advantages"],
                                   whole["target_mask"], loss_cfg)
        assert dens == pytest.approx(float(d), rel=1e-6)
        assert nums / dens == pytest.approx(float(n) / float(d), rel=1e-5)
    assert sorted(samples.index(x) for x in covered) == list(range(18))


def test_split_minibatches():
    chunks = split_minibatches(10, 3, shuffle=True, seed=1)
    assert [len(c) for c in chunks] == [4, 3, 3] and sorted(np.concatenate(chunks).tolist()) == list(range(10))
    assert [c.tolist() for c in split_minibatches(4, 2)] == [[0, 1], [2, 3]]
    assert row_denominators(np.array([3, 0, 5]), GRPOLossConfig(loss_agg_mode="token-mean")).tolist() == [3, 0, 5]


# ---------------------------------------------------------------------------------------------- on a tiny model


def test_tiny_model_uses_the_images_and_the_ratio_moves_after_the_first_minibatch(cfg):
    rng = np.random.default_rng(5)
    samples = [rl_sample(make_record(rng, [(1, 4, 4)], cfg.vision.patch_dim), a, cfg, episode_id=f"e{i}")
               for i, a in enumerate([1.0, -0.5, 0.8, -1.2])]
    rl_cfg = RLBatchConfig(buckets=(128,), max_tokens_per_device=4096, num_minibatches=2, pad_id=PAD,
                           vision_row_buckets=(64,))
    loss_cfg = GRPOLossConfig(loss_agg_mode="token-mean")
    first, second = (m[0] for m in build_rl_batches(samples, cfg, loss_cfg, rl_cfg).minibatches)
    assert first["input_ids"].shape == second["input_ids"].shape  # one compiled shape for the whole test
    assert first["vision"] is not None and second["vision"] is not None

    graphdef, params, rest = nnx.split(Qwen3VL(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    logprobs_of = jax.jit(lambda p, b: policy_logprobs(nnx.merge(graphdef, p, rest), b)[0])
    grad_of = jax.jit(jax.grad(lambda p, b: make_grpo_loss(loss_cfg)(nnx.merge(graphdef, p, rest), b)[:2],
                               has_aux=True))

    # the "rollout engine" is the initial policy: its logprobs become each batch's old/rollout logprobs
    for batch in (first, second):
        lp = np.where(batch["target_mask"] > 0, np.asarray(logprobs_of(params, _device(batch))), 0)
        batch["old_logprobs"] = batch["rollout_logprobs"] = lp.astype(np.float32)
    # the pixels matter: the same batch with blank images gives other logprobs
    blind = {**first, "vision": {**first["vision"], "pixel_values": np.zeros_like(first["vision"]["pixel_values"])}}
    on = first["target_mask"] > 0
    assert np.abs(np.asarray(logprobs_of(params, _device(blind))) - first["old_logprobs"])[on].max() > 1e-3

    def metrics(p, batch):
        lp = logprobs_of(p, _device(batch))
        stats = grpo_policy_loss(lp, batch["old_logprobs"], batch["advantages"], batch["target_mask"], loss_cfg,
                                 rollout_logprobs=batch["rollout_logprobs"])[2]
        return finalize_metrics(stats)

    before = metrics(params, first)
    assert before["ppo_kl"] == 0 and before["ratio_max"] == 1 and before["rollout_mismatch/abs_max"] == 0
    # one SGD step on the first mini-batch through the learner-style loss (Σ grads / Σ denominators)
    grads, den = grad_of(params, _device(first))
    params = jax.tree.map(lambda w, g: w - 2.0 * g / den, params, grads)
    # the second mini-batch keeps the rollout's old logprobs, so its ratio is no longer 1
    after = metrics(params, second)
    assert abs(after["ppo_kl"]) > 1e-4 and abs(after["ratio_max"] - 1) > 1e-3
    assert after["rollout_mismatch/abs_mean"] > 1e-4


def test_chunked_head_and_temperature_give_the_full_logits_logprobs(cfg, samples):
    batch = _device(collate_rl(samples[:2], 160, cfg, cfg=RLBatchConfig(pad_id=PAD, vision_row_buckets=(64,))))
    graphdef, params, rest = nnx.split(Qwen3VL(cfg, rngs=nnx.Rngs(1)), nnx.Param, ...)

    def both(p, b):
        model = nnx.merge(graphdef, p, rest)
        logits = model(b["input_ids"], b["positions"], b["attention_mask"], b["vision"]).logits / 0.7
        return token_logprobs(logits, b["targets"]), policy_logprobs(model, b, 0.7, logits_chunk=24)[0]

    full, chunked = jax.jit(both)(params, batch)
    on = np.asarray(batch["target_mask"]) > 0
    assert "loss_positions" in batch and on.any()  # the head ran on the trained positions only
    np.testing.assert_allclose(np.asarray(chunked)[on], np.asarray(full)[on], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(chunked)[~on], 0.0)
    with pytest.raises(ValueError, match="entropy"):
        policy_logprobs(None, batch, logits_chunk=24, with_entropy=True)

def _device(batch: dict) -> dict:
    """The learner's device batch plus the RL keys (see the report on `device_batch`)."""
    rl_keys = ("old_logprobs", "advantages", "rollout_logprobs", "row_denominator")
    return {**device_batch(batch), **{k: jnp.asarray(batch[k]) for k in rl_keys if k in batch}}


def test_fixed_head_sizes_and_vision_rows_in_every_batch_keep_the_loss(cfg, samples):
    """The demo's few-programs settings: configured K sizes and vision rows for image-less micro-batches change
    shapes only, never the loss or its gradients."""
    image_less = [s for s in samples if s.example.pixel_values is None]
    assert image_less  # GRIDS has a sample without images
    loss_cfg = GRPOLossConfig(loss_agg_mode="token-mean")
    plain = RLBatchConfig(buckets=(160,), max_tokens_per_device=160, pad_id=PAD, vision_row_buckets=(64,))
    few = dataclasses.replace(plain, vision_in_every_batch=True, loss_position_buckets=(40, 96))
    with pytest.raises(ValueError, match="loss_position_buckets"):
        dataclasses.replace(plain, loss_position_buckets=(96, 40))

    def micro_batches(rl_cfg):
        return [m for mb in build_rl_batches(samples, cfg, loss_cfg, rl_cfg).minibatches for m in mb]

    default, fixed = micro_batches(plain), micro_batches(few)
    assert [m["sample_index"].tolist() for m in default] == [m["sample_index"].tolist() for m in fixed]
    assert {m["loss_positions"].shape[1] for m in fixed} <= {40, 96}
    assert any(m["vision"] is None for m in default)
    assert all(m["vision"] is not None and m["vision"]["pixel_values"].shape[0] == 64 for m in fixed)

    graphdef, params, rest = nnx.split(Qwen3VL(cfg, rngs=nnx.Rngs(2)), nnx.Param, ...)
    logprobs_of = jax.jit(lambda p, b: policy_logprobs(nnx.merge(graphdef, p, rest), b)[0])
    grad_of = jax.jit(jax.grad(lambda p, b: make_grpo_loss(loss_cfg)(nnx.merge(graphdef, p, rest), b)[:2],
                               has_aux=True))
    for a, b in zip(default, fixed):
        for batch in (a, b):  # the rollout policy: near this one (ratios inside the clip range, so gradients flow)
            lp = np.asarray(logprobs_of(params, _device(batch))) - 0.05
            batch["old_logprobs"] = batch["rollout_logprobs"] = np.where(batch["target_mask"] > 0, lp, 0)
        (ga, da), (gb, db) = grad_of(params, _device(a)), grad_of(params, _device(b))
        assert float(da) == float(db) > 0
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(gb)) > 1e-4
        for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
