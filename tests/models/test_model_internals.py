"""Model pieces checked against direct formulas or against another path of the model itself."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsjax.models.qwen3_vl import reference as R
from gsjax.models.qwen3_vl.attention import attend, attend_cached, cached_mask, causal_mask
from gsjax.models.qwen3_vl.config import PRESETS, ConfigError, Qwen3VLConfig, preset
from gsjax.models.qwen3_vl.model import DecodeCache, Qwen3VL, prepare_inputs
from gsjax.models.qwen3_vl.rope import get_rope_index, mrope_axis_of_channel
from gsjax.models.qwen3_vl.vision import vision_inputs

from .conftest import GRIDS


def test_rope_index_matches_spec_example():
    # [<|im_start|>, u, \n, VS, IMG×6 (grid 1×4×6), VE, a, b, <|im_end|>] (spec §3.3)
    ids = np.array([[9, 8, 7, 202] + [200] * 6 + [203, 5, 6, 4]])
    pos, delta = get_rope_index(ids, image_token_id=200, video_token_id=201, spatial_merge_size=2,
                                image_grid_thw=np.array([[1, 4, 6]]))
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9, 10]
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9, 10]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9, 10]
    assert delta.tolist() == [-3]


def test_rope_index_padding_and_errors():
    ids = np.array([[0, 0, 5, 6, 7], [5, 6, 7, 0, 0]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    pos, delta = get_rope_index(ids, image_token_id=200, video_token_id=201, spatial_merge_size=2,
                                attention_mask=mask)
    assert pos[0, 0].tolist() == [0, 0, 0, 1, 2] and pos[0, 1].tolist() == [0, 1, 2, 0, 0]
    assert delta.tolist() == [0, 0]
    with pytest.raises(ValueError, match="more image placeholder tokens"):
        get_rope_index(np.array([[1, 200, 200, 200, 200]]), image_token_id=200, video_token_id=201,
                       spatial_merge_size=2, image_grid_thw=np.zeros((0, 3), int))


def test_mrope_channel_assignment_has_t_tail():
    axis = mrope_axis_of_channel(128, (24, 20, 20))
    assert (axis == 1).sum() == 20 and (axis == 2).sum() == 20 and (axis == 0).sum() == 24
    assert axis[60:].tolist() == [0, 0, 0, 0] and axis[:6].tolist() == [0, 1, 2, 0, 1, 2]


def test_preset_parameter_counts_match_spec():
    expected = {"2b": 2_127_532_032, "4b": 4_437_815_808, "8b": 8_767_123_696, "30b-a3b": 31_070_754_032}
    for name, count in expected.items():
        model = nnx.eval_shape(lambda n=name: Qwen3VL(preset(n), rngs=nnx.Rngs(0)))
        params = nnx.state(model, nnx.Param)
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        assert total == count, (name, total)


def test_initial_params_depend_on_the_seed_only_and_no_two_random_ones_are_equal():
    """Parameter keys are a Python-counted fold of one key (ParamKeys): the same seed rebuilds the same model,
    another seed another one, and every randomly initialised parameter gets its own key."""
    def leaves(seed: int) -> list[np.ndarray]:
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(Qwen3VL(preset("tiny"), rngs=nnx.Rngs(seed))))]

    first, again, other = leaves(0), leaves(0), leaves(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    random = [x for x in first if x.size > 1 and np.std(x) > 0]
    assert len(random) > 20 and len({x.ravel()[:4].tobytes() for x in random}) == len(random)
    assert all(not np.array_equal(a, b) for a, b in zip(first, other, strict=True) if a.size > 1 and np.std(a) > 0)
    assert all(abs(float(np.std(x)) - 0.02) < 0.005 for x in random if x.size >= 4096)  # normal_init(0.02)


def test_config_reads_hub_and_v5_forms(hf_dirs):
    import json

    v5 = json.loads((hf_dirs["moe"] / "config.json").read_text())
    cfg = Qwen3VLConfig.from_hf_dict(v5)
    hub = cfg.to_hf_dict()
    assert "rope_scaling" in hub["text_config"] and "num_experts" in hub["text_config"]
    again = Qwen3VLConfig.from_hf_dict(hub)
    assert again.text == cfg.text and again.vision == cfg.vision
    assert cfg.text.rope_theta == 5e6 and cfg.text.num_experts == 6 and cfg.text.mrope_section == (6, 3, 3)
    broken = json.loads(json.dumps(v5))
    broken["text_config"]["rope_parameters"]["mrope_section"] = [6, 3, 2]
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen3VLConfig.from_hf_dict(broken)
    del broken["text_config"]["head_dim"]
    with pytest.raises(ConfigError, match="head_dim"):
        Qwen3VLConfig.from_hf_dict(broken)


@pytest.mark.parametrize("padded", [True, False])
def test_chunked_attention_and_its_gradients_equal_dense(padded):
    """The blocked kernel's own backward (recomputed scores) against autodiff of the dense kernel."""
    rng = jax.random.PRNGKey(0)
    q, k, v, weight = (jax.random.normal(key, shape) for key, shape in zip(
        jax.random.split(rng, 4), [(2, 300, 4, 16), (2, 300, 2, 16), (2, 300, 2, 16), (2, 300, 4, 16)]))
    valid = jnp.arange(300)[None, :] >= jnp.array([[0], [37]])  # row 1 left-padded
    mask = causal_mask(valid if padded else None)
    rows = np.asarray(valid) if padded else np.ones((2, 300), bool)  # fully masked rows are padding, never read

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.where(rows[:, :, None, None], attend(q, k, v, mask, impl=impl, chunk=64),
                                                 0) * weight)

    dense = attend(q, k, v, mask, impl="xla")
    chunked = attend(q, k, v, mask, impl="chunked", chunk=64)
    assert np.abs(np.asarray(dense - chunked))[rows].max() < 1e-5
    expected = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    for name, e, g in zip("qkv", expected, got):
        assert np.abs(np.asarray(e - g)).max() < 1e-4, name


def test_chunked_attention_keeps_the_input_dtype():
    q, k, v = (jnp.ones(shape, jnp.bfloat16) for shape in [(1, 200, 4, 8), (1, 200, 2, 8), (1, 200, 2, 8)])
    out, grads = jax.value_and_grad(lambda q: jnp.sum(attend(q, k, v, causal_mask(None), impl="chunked",
                                                                chunk=64).astype(jnp.float32)))(q)
    assert grads.dtype == jnp.bfloat16 and np.isfinite(float(out))
    assert attend(q, k, v, causal_mask(None), impl="chunked", chunk=64).dtype == jnp.bfloat16


@pytest.mark.parametrize("impl", ["chunked", "xla"])
@pytest.mark.parametrize("queries", [1, 5])
def test_attention_over_a_head_major_cache_equals_the_dense_kernel(queries, impl):
    """`attend_cached` reads (B, K, S, H) caches: one query per row through a decode kernel (blocked on CPU's
    "chunked", windowed otherwise), several through the (B, S, K, H) kernels; all equal dense attention, and
    masked columns past the live keys (a wider window or cache) change nothing, bit for bit, for a decode step."""
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(keys[0], (3, queries, 8, 16))
    k, v = (jax.random.normal(key, (3, 2, 64, 16)) for key in keys[1:])  # (B, K, S, H), GQA 8 / 2
    lengths = jnp.array([7, 23, 64 - queries])
    valid = jnp.arange(64)[None, :] < (lengths + queries)[:, None]
    valid = valid.at[1, 3].set(False)  # a hole inside a row
    mask = cached_mask(lengths[:, None] + jnp.arange(queries)[None, :], valid)
    expected = attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, impl="xla")
    got = attend_cached(q, k, v, mask, impl=impl, chunk=16)
    assert np.abs(np.asarray(got - expected)).max() < 1e-5
    if queries == 1:  # rows 0 and 1 hold fewer than 32 keys: a 32-column window and all 64 agree exactly
        window = attend_cached(q[:2], k[:2, :, :32], v[:2, :, :32], cached_mask(mask.q_index[:2], valid[:2, :32]),
                               impl=impl, chunk=16)
        whole = attend_cached(q[:2], k[:2], v[:2], cached_mask(mask.q_index[:2], valid[:2]), impl=impl, chunk=16)
        np.testing.assert_array_equal(np.asarray(window), np.asarray(whole))
        # blocked: rows 0 and 1 give the same bits beside row 2, whose 64 keys take the loop through 4 blocks
        both = attend_cached(q, k, v, mask, impl=impl, chunk=16)
        np.testing.assert_array_equal(np.asarray(both[:2]), np.asarray(whole))


def test_blocked_decode_stops_at_the_key_bound():
    """A sampler's idle slots keep advancing; `key_bound` (its longest live row) stops the blocked kernel there:
    the NaN keys past it are never read, so the live rows are right and even the idle row stays finite, while
    without a bound the loop runs to the idle row's own query index and reads them."""
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    q = jax.random.normal(keys[0], (2, 1, 4, 8))
    k, v = (jax.random.normal(key, (2, 2, 64, 8)) for key in keys[1:])
    k, v = k.at[1, :, 32:].set(jnp.nan), v.at[1, :, 32:].set(jnp.nan)  # the idle slot's keys past the bound
    q_index = jnp.array([[20], [60]])  # row 0 live (21 keys), row 1 an idle slot that kept advancing
    valid = jnp.arange(64)[None, :] <= q_index
    dense = attend(q[:1], jnp.swapaxes(k[:1, :, :21], 1, 2), jnp.swapaxes(v[:1, :, :21], 1, 2),
                   cached_mask(q_index[:1], valid[:1, :21]), impl="xla")
    bounded = attend_cached(q, k, v, cached_mask(q_index, valid, 21), impl="chunked", chunk=16)
    assert np.isfinite(np.asarray(bounded)).all()
    assert np.abs(np.asarray(bounded[:1] - dense)).max() < 1e-5
    unbounded = attend_cached(q, k, v, cached_mask(q_index, valid), impl="chunked", chunk=16)
    assert np.isnan(np.asarray(unbounded[1])).all() and np.isfinite(np.asarray(unbounded[0])).all()


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_stale_nan_in_masked_cache_columns_is_never_read(impl):
    """A freed slot may hold a diverged request's NaN/inf keys and values past the next occupant's tokens (and in
    holes); both decode kernels give that occupant the same result as a clean cache."""
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    q = jax.random.normal(keys[0], (2, 1, 4, 8))
    k, v = (jax.random.normal(key, (2, 2, 48, 8)) for key in keys[1:])
    q_index = jnp.array([[20], [37]])
    valid = (jnp.arange(48)[None, :] <= q_index).at[1, 5].set(False)
    stale = ~valid[:, None, :, None]
    dirty_k, dirty_v = jnp.where(stale, jnp.nan, k), jnp.where(stale, jnp.inf, v)
    mask = cached_mask(q_index, valid)
    clean = attend_cached(q, k, v, mask, impl=impl, chunk=16)
    dirty = attend_cached(q, dirty_k, dirty_v, mask, impl=impl, chunk=16)
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))


def _tiny(moe: bool = False, **runtime) -> Qwen3VL:
    cfg = preset("tiny-moe" if moe else "tiny")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=256),
                              image_token_id=200, video_token_id=201, vision_start_token_id=202,
                              vision_end_token_id=203)
    return Qwen3VL(cfg.with_runtime(**runtime), rngs=nnx.Rngs(3))


def test_moe_ragged_equals_dense_path():
    model = _tiny(moe=True)
    ids = np.random.default_rng(0).integers(0, 190, (2, 12))
    inp = prepare_inputs(model.config, ids)
    ragged = model(inp["input_ids"], inp["positions"])
    model.config = model.config.with_runtime(moe_impl="dense")
    for layer in model.layers:
        layer.mlp.impl = "dense"
    dense = model(inp["input_ids"], inp["positions"])
    assert np.abs(np.asarray(ragged.logits - dense.logits)).max() < 1e-5
    assert float(ragged.router.rows) == 24 * 4  # 24 tokens × 4 MoE layers
    np.testing.assert_allclose(np.asarray(ragged.router.top_k_counts).sum(), 24 * 4 * 2)


def _loss(model: Qwen3VL, inp) -> jax.Array:
    return jnp.mean(model(inp["input_ids"], inp["positions"], None, inp["vision"]).logits ** 2)


def test_remat_policies_give_identical_gradients():
    grids = [(1, 4, 4)]
    ids = R.image_prompt(grids, 200, 202, 203)[None]
    inputs = None
    grads = {}
    for policy in ("none", "full", "dots"):
        model = _tiny(remat=policy, vision_remat=policy)
        pixels = R.random_pixels(grids, model.config.vision.patch_dim)
        inputs = inputs or prepare_inputs(model.config, ids, None, pixels, np.asarray(grids))
        grads[policy] = nnx.grad(_loss)(model, inputs)
    for policy in ("full", "dots"):
        diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads["none"], grads[policy])
        assert max(jax.tree.leaves(diffs)) < 1e-6


def test_per_layer_remat_list_is_validated():
    with pytest.raises(ConfigError, match="3 policies for 4 layers"):
        _tiny(remat=("full", "none", "full"))(*_text_inputs())


def _text_inputs():
    inp = prepare_inputs(PRESETS["tiny"], np.array([[1, 2, 3]]))
    return inp["input_ids"], inp["positions"]


def test_cached_decode_equals_full_forward():
    """Prefill with a left-padded batch, then decode token by token: logits equal the full forward's."""
    model = _tiny()
    grids = [(1, 4, 4)]
    prompt = R.image_prompt(grids, 200, 202, 203)
    ids = np.stack([prompt, np.concatenate([np.zeros(4, int), prompt[4:] % 190])])
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    pv = R.random_pixels(grids, model.config.vision.patch_dim)
    full_ids = np.concatenate([ids, np.array([[11, 12, 13], [21, 22, 23]])], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, 3), int)], axis=1)
    full = prepare_inputs(model.config, full_ids, full_mask, pv, np.asarray(grids))
    expected = np.asarray(model(full["input_ids"], full["positions"], full["attention_mask"], full["vision"]).logits)

    pre = prepare_inputs(model.config, ids, mask, pv, np.asarray(grids))
    cache = DecodeCache.create(model.config, batch=2, max_len=32)
    out = model(pre["input_ids"], pre["positions"], pre["attention_mask"], pre["vision"], cache=cache)
    np.testing.assert_allclose(np.asarray(out.logits)[0], expected[0, :ids.shape[1]], atol=1e-5)
    cache, valid_so_far = out.cache, mask.sum(1)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, i, p, c: nnx.merge(graphdef, s)(i, p, None, None, cache=c))
    for t in range(3):
        new = full_ids[:, ids.shape[1] + t][:, None]
        positions = np.broadcast_to((valid_so_far + pre["deltas"])[None, :, None], (3, 2, 1))
        out = step(state, new, positions, cache)
        cache, valid_so_far = out.cache, valid_so_far + 1
        np.testing.assert_allclose(np.asarray(out.logits)[:, 0], expected[:, ids.shape[1] + t], atol=1e-5)


def test_vision_padding_rows_do_not_change_outputs():
    model = _tiny()
    ids = R.image_prompt(GRIDS, 200, 202, 203)[None]
    pv = R.random_pixels(GRIDS, model.config.vision.patch_dim)
    plain = prepare_inputs(model.config, ids, None, pv, np.asarray(GRIDS))
    padded = prepare_inputs(model.config, ids, None, pv, np.asarray(GRIDS), pad_vision_to=80)
    assert padded["vision"].pixel_values.shape[0] == 80
    a = model(plain["input_ids"], plain["positions"], None, plain["vision"]).logits
    b = model(padded["input_ids"], padded["positions"], None, padded["vision"]).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_mismatched_image_tokens_are_refused():
    cfg = _tiny().config
    ids = R.image_prompt([(1, 4, 4)], 200, 202, 203)[None]
    with pytest.raises(ValueError, match="image tokens"):
        prepare_inputs(cfg, ids, None, R.random_pixels([(1, 4, 6)], cfg.vision.patch_dim), np.array([[1, 4, 6]]))
    with pytest.raises(ValueError, match="does not match image_grid_thw"):
        vision_inputs(np.zeros((10, cfg.vision.patch_dim)), np.array([[1, 4, 4]]), cfg.vision)


def test_flops_match_spec_table():
    from gsjax.models.qwen3_vl.flops import text_matmul_params, train_flops_per_token

    assert text_matmul_params(preset("8b")) == 7_568_097_280
    assert text_matmul_params(preset("4b")) == 4_022_272_000
    assert text_matmul_params(preset("2b")) == 1_720_451_072
    assert text_matmul_params(preset("30b-a3b")) == 3_041_656_832
    # 8B training FLOPs/token at S = 4096: 49.03 G (causal), 52.66 G (full)
    assert round(train_flops_per_token(preset("8b"), 4096) / 1e9, 2) == 49.03
    assert round(train_flops_per_token(preset("8b"), 4096, causal=False) / 1e9, 2) == 52.66


def test_greedy_decode_equals_argmax_of_full_forward():
    from gsjax.models.qwen3_vl.forward import Runner

    runner = Runner(_tiny())
    grids = [(1, 4, 4)]
    ids = R.image_prompt(grids, 200, 202, 203)[None]
    arrays = {"input_ids": ids, "pixel_values": R.random_pixels(grids, runner.config.vision.patch_dim),
              "image_grid_thw": np.asarray(grids)}
    new = runner.greedy(arrays, max_new_tokens=5)
    for t in range(new.shape[1]):
        full = runner.logits({**arrays, "input_ids": np.concatenate([ids, new[:, :t]], axis=1)})
        assert full[0, -1].argmax() == new[0, t]
