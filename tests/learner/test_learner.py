"""The sharded learner: layouts agree with one device, accumulation equals one batch, SFT loss and
gradients equal transformers', frozen params stay frozen."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gsjax.models.qwen3_vl import reference as R
from gsjax.models.qwen3_vl.config import preset
from gsjax.models.qwen3_vl.model import prepare_inputs
from gsjax.parallel.mesh import MeshConfig, build_mesh
from gsjax.parallel.sharding import ShardingError
from gsjax.train.learner import Learner
from gsjax.train.state import OptimizerSettings, init_state, make_optimizer, state_shardings

jax.config.update("jax_default_matmul_precision", "highest")

GRIDS = [(1, 4, 4)]
NEEDS_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def tiny_config(moe: bool = False):
    cfg = preset("tiny-moe" if moe else "tiny")
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=256), image_token_id=200,
                               video_token_id=201, vision_start_token_id=202, vision_end_token_id=203)


def make_batch(config, rows: int, seed: int = 0, length: int = 24, image_rows: int = 1,
               grids: list[tuple[int, int, int]] = GRIDS) -> dict:
    """Rows of random text; the first `image_rows` rows carry an image each; the last 40 % of each row is the
    'assistant' part."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 190, size=(rows, length))
    img = R.image_prompt(grids, 200, 202, 203, text_ids=(5, 6, 7))
    ids[:image_rows, 2:2 + img.size] = img
    mask = np.ones_like(ids, dtype=bool)
    mask[-1, -3:] = False  # right padding in the last row
    ids[-1, -3:] = 0
    assistant = np.zeros_like(ids, dtype=bool)
    assistant[:, int(length * 0.6):] = True
    assistant &= mask
    pv = R.random_pixels(grids * image_rows, config.vision.patch_dim, seed)
    inp = prepare_inputs(config, ids, mask, pv, np.asarray(grids * image_rows))
    targets = np.concatenate([ids[:, 1:], np.zeros((rows, 1), ids.dtype)], axis=1).astype(np.int32)
    target_mask = np.concatenate([assistant[:, 1:], np.zeros((rows, 1), bool)], axis=1).astype(np.float32)
    return {"input_ids": inp["input_ids"], "attention_mask": mask, "positions": inp["positions"],
            "targets": targets, "target_mask": target_mask, "vision": inp["vision"]}


def make_learner(config, mesh_cfg: MeshConfig, freeze=("visual",), steps: int = 10):
    # eps=1e-4: Adam's first step is ~lr·sign(g), which would amplify float-rounding noise in
    # near-zero gradients into lr-sized differences between layouts; a larger eps keeps it linear there.
    settings = OptimizerSettings(lr=1e-2, weight_decay=0.01, eps=1e-4, warmup_steps=0, total_steps=steps)
    optimizer = make_optimizer(settings)
    mesh = build_mesh(mesh_cfg, jax.devices()[: _size(mesh_cfg)])
    setup = state_shardings(config, freeze, optimizer, mesh)
    return Learner(setup, optimizer), init_state(config, freeze, optimizer, setup, seed=0)


def _size(mesh_cfg: MeshConfig) -> int:
    return int(np.prod([max(getattr(mesh_cfg, a), 1) for a in ("data", "fsdp", "expert", "tensor")]))


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


_REFERENCE_RUNS: dict = {}


def _reference_run(config, batches):
    """The 1-device run, computed once per model kind for all layouts."""
    key = config.text.num_experts
    if key not in _REFERENCE_RUNS:
        _REFERENCE_RUNS[key] = _run(config, MeshConfig(fsdp=1), batches)
    return _REFERENCE_RUNS[key]


def _run(config, mesh_cfg, batches):
    learner, state = make_learner(config, mesh_cfg)
    losses = []
    for b in batches:
        state, metrics = learner.step(state, b)
        losses.append(float(metrics["loss"]))
    return losses, _host(state["params"])


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


@NEEDS_8
@pytest.mark.parametrize("moe,layout", [
    (False, MeshConfig(fsdp=8)),
    (False, MeshConfig(fsdp=4, tensor=2)),
    (False, MeshConfig(data=2, fsdp=4)),
    (True, MeshConfig(expert=2, fsdp=4)),
])
def test_sharded_steps_match_one_device(moe, layout):
    """Two optimizer steps on one batch: loss and updated params equal the 1-device run (fp32, ≤ 2e-5 abs)."""
    config = tiny_config(moe)
    batches = [make_batch(config, 8, seed=0)] * 2
    ref_losses, ref_params = _reference_run(config, batches)
    losses, params = _run(config, layout, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert _max_diff(params, ref_params) < 2e-5
    assert ref_losses[1] < ref_losses[0]


@NEEDS_8
def test_vision_rows_are_split_over_the_batch_devices_and_the_step_is_unchanged():
    """8 images of 8x8 patches (512 rows) on fsdp=8: each device holds and encodes 64 rows, and the compiled
    step does less work per device than with every image on every device. One image of 24 rows is padded to
    4 rows per device. Two steps on these batches (vision trained) equal the 1-device run."""
    config = tiny_config()
    batch = make_batch(config, 8, length=40, image_rows=8, grids=[(1, 8, 8)])
    learner, state = make_learner(config, MeshConfig(fsdp=8), freeze=())
    placed = learner.shard_batch(batch)
    pixels = placed["vision"].pixel_values
    assert pixels.shape[0] == 512 and {s.data.shape[0] for s in pixels.addressable_shards} == {64}
    replicated = NamedSharding(learner.setup.mesh, PartitionSpec())
    everywhere = {**placed, "vision": jax.tree.map(lambda a: jax.device_put(a, replicated), placed["vision"])}
    flops = [learner._step.lower(state, b).compile().cost_analysis()["flops"] for b in (everywhere, placed)]
    assert flops[1] < 0.8 * flops[0], flops

    odd = make_batch(config, 8, length=40, image_rows=1, grids=[(1, 4, 6)])  # 24 rows: padded to 4 per device
    assert {s.data.shape[0] for s in learner.shard_batch(odd)["vision"].pixel_values.addressable_shards} == {4}

    runs = []
    for mesh_cfg in (MeshConfig(fsdp=1), MeshConfig(fsdp=8)):
        learner, state = make_learner(config, mesh_cfg, freeze=())
        losses = []
        for b in (batch, odd):
            state, metrics = learner.step(state, b)
            losses.append(float(metrics["loss"]))
        runs.append((losses, _host(state["params"])))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5)
    assert _max_diff(runs[1][1]["visual"], runs[0][1]["visual"]) < 2e-5
    assert _max_diff(runs[1][1], runs[0][1]) < 2e-5


def test_accumulation_equals_one_big_batch():
    config = tiny_config()
    big = make_batch(config, 4, seed=3)
    halves = [{k: (v if k == "vision" else (v[:, :2] if k == "positions" else v[:2])) for k, v in big.items()},
              {k: (None if k == "vision" else (v[:, 2:] if k == "positions" else v[2:])) for k, v in big.items()}]
    learner, state = make_learner(config, MeshConfig(fsdp=1))
    one, m1 = learner.step(jax.tree.map(jnp.copy, state), big)
    acc, m2 = learner.accumulate(state, halves)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    assert float(m1["tokens"]) == float(m2["tokens"]) == float(big["target_mask"].sum())
    assert _max_diff(_host(one["params"]), _host(acc["params"])) < 5e-6  # a few fp32 ulps of params ~1


def test_frozen_vision_gets_no_optimizer_state_and_does_not_move():
    config = tiny_config()
    learner, state = make_learner(config, MeshConfig(fsdp=1))
    assert all(not p.startswith("visual") for p in _paths(state["params"]))
    assert any(p.startswith("visual") for p in _paths(state["frozen"]))
    opt_leaves = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    trainable = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert opt_leaves < 2 * trainable + 16  # two Adam moments of trainable params only (+ counters)
    before = _host(state["frozen"])
    state, _ = learner.step(state, make_batch(config, 2))
    assert _max_diff(before, _host(state["frozen"])) == 0.0


def _paths(state) -> list[str]:
    return [".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)]


def test_sft_loss_and_gradients_equal_transformers(tmp_path):
    """Same tiny checkpoint and batch: HF loss with labels -100 on masked tokens, and its gradients."""
    import torch

    from gsjax.models.qwen3_vl.checkpoint import hf_rules, load_hf
    from gsjax.train.model_loss import sft_loss

    hf_dir = R.build_tiny_hf(tmp_path / "hf", seed=4)
    model = load_hf(hf_dir)
    batch = make_batch(model.config, 2, seed=1)
    hf = R.load_hf_model(hf_dir)
    labels = np.where(np.concatenate([np.zeros((2, 1)), batch["target_mask"][:, :-1]], 1) > 0,
                      batch["input_ids"], -100)
    pv = torch.as_tensor(np.asarray(R.random_pixels(GRIDS, model.config.vision.patch_dim, 1)))
    out = hf(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
             attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
             position_ids=torch.as_tensor(batch["positions"], dtype=torch.long), pixel_values=pv,
             image_grid_thw=torch.as_tensor(GRIDS), labels=torch.as_tensor(labels, dtype=torch.long))
    out.loss.backward()

    def mean_loss(m):
        s, d = sft_loss(m, batch)
        return s / d

    loss, grads = nnx.value_and_grad(mean_loss)(model)
    assert abs(float(loss) - float(out.loss.detach())) < 1e-5
    ours = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    hf_grads = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}
    worst = 0.0
    for rule in hf_rules(model.config):
        if rule.hf_key not in hf_grads:
            continue
        for path, g in zip(rule.paths, rule.to_jax(hf_grads[rule.hf_key])):
            scale = max(float(np.abs(g).max()), 1e-6)
            worst = max(worst, float(np.abs(ours[path] - g).max()) / scale)
    assert worst < 1e-4, worst


def test_indivisible_layout_is_refused_with_the_parameter_named():
    config = dataclasses.replace(tiny_config(), text=dataclasses.replace(tiny_config().text, num_key_value_heads=1,
                                                                           num_attention_heads=3, head_dim=24))
    if jax.device_count() < 2:
        pytest.skip("needs two devices")
    named = r"parameter layers\.0\.self_attn\.[qk]_proj: dimension 1 .* does not divide"
    with pytest.raises(ShardingError, match=named):
        make_learner(config, MeshConfig(fsdp=1, tensor=2))


@pytest.mark.parametrize("chunk", [7, 24])
def test_chunked_lm_head_loss_equals_the_full_one(chunk):
    """Same loss and gradients with the LM head applied 7 (padded) or 24 positions at a time."""
    from gsjax.models.qwen3_vl.model import Qwen3VL
    from gsjax.train.model_loss import sft_loss

    config = tiny_config()
    model = Qwen3VL(config, rngs=nnx.Rngs(0))
    batch = make_batch(config, 2, seed=5)

    def mean_loss(m, logits_chunk):
        s, d = sft_loss(m, batch, logits_chunk)
        return s / d

    full, g_full = nnx.value_and_grad(lambda m: mean_loss(m, 0))(model)
    chunked, g_chunk = nnx.value_and_grad(lambda m: mean_loss(m, chunk))(model)
    np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
    assert _max_diff(_host(nnx.state(g_full)), _host(nnx.state(g_chunk))) < 1e-6


@NEEDS_8
@pytest.mark.parametrize("chunk", [0, 48])
def test_head_at_loss_positions_only_equals_the_full_head(chunk):
    """With `loss_positions` (the LM head over the trained positions only) two fsdp=8 steps give the loss and
    params of the full-head one-device run; the batch's K is well below its length."""
    from gsjax.data.collate import loss_positions
    from gsjax.train.model_loss import make_sft_loss

    config = tiny_config()
    batch = make_batch(config, 8, seed=7, length=192)
    batch["target_mask"][:, :150] = 0  # 41 trained targets per row at most
    compact = {**batch, "loss_positions": loss_positions(batch["target_mask"])}
    assert compact["loss_positions"].shape == (8, 64)

    def run(mesh_cfg, b):
        learner, state = make_learner(config, mesh_cfg)
        learner = Learner(learner.setup, learner.optimizer, make_sft_loss(chunk))
        losses = []
        for _ in range(2):
            state, metrics = learner.step(state, b)
            losses.append(float(metrics["loss"]))
        return losses, _host(state["params"])

    ref_losses, ref_params = run(MeshConfig(fsdp=1), batch)
    losses, params = run(MeshConfig(fsdp=8), compact)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert _max_diff(params, ref_params) < 2e-5


@NEEDS_8
def test_sharded_hf_load_places_each_slice_where_the_layout_says(tmp_path):
    """HF weights read slice by slice onto fsdp=4×tensor=2: same values as a plain load, target shardings,
    and no device holds a full copy of a sharded tensor."""
    from gsjax.models.qwen3_vl.checkpoint import load_hf
    from gsjax.train.state import sharded_place, state_from_model

    hf_dir = R.build_tiny_hf(tmp_path / "hf", seed=2)
    plain = load_hf(hf_dir)
    optimizer = make_optimizer(OptimizerSettings())
    setup = state_shardings(plain.config, ("visual",), optimizer, build_mesh(MeshConfig(fsdp=4, tensor=2)))
    state = state_from_model(load_hf(hf_dir, place=sharded_place(setup, ("visual",))), ("visual",), optimizer,
                             setup, seed=0)
    expected = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(plain, nnx.Param))}
    wanted = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(setup.state_shardings["params"])}
    for path, var in nnx.to_flat_state(state["params"]):
        name = ".".join(map(str, path))
        array = var.get_value()
        assert array.sharding.is_equivalent_to(wanted[name], array.ndim), name
        np.testing.assert_array_equal(np.asarray(array), np.asarray(expected[name]))
    q = state["params"]["layers"][0]["self_attn"]["q_proj"].get_value()
    assert q.addressable_shards[0].data.size == q.size // 8  # embed over fsdp=4, heads over tensor=2


def test_bf16_compute_with_fp32_master_weights():
    """Mixed precision: bf16 activations, fp32 params and Adam moments; loss within bf16 error of fp32."""
    config = tiny_config()
    bf16 = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, dtype="bfloat16"))
    batch = make_batch(config, 2, seed=6)
    losses = {}
    for name, cfg in (("fp32", config), ("bf16", bf16)):
        learner, state = make_learner(cfg, MeshConfig(fsdp=1))
        state, metrics = learner.step(state, batch)
        losses[name] = float(metrics["loss"])
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    assert np.isfinite(losses["bf16"]) and abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]
