"""The vision tower's banded block-diagonal attention (runtime.vision_max_frame_rows) equals the dense one,
costs O(N·rows) instead of O(N²), and refuses frames past its bound instead of mis-attending."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsjax.models.qwen3_vl import reference as R
from gsjax.models.qwen3_vl.attention import attend, segment_mask
from gsjax.models.qwen3_vl.config import ConfigError, preset
from gsjax.models.qwen3_vl.model import Qwen3VL, prepare_inputs
from gsjax.models.qwen3_vl.vision import longest_segment, vision_inputs


def contiguous_segments(lengths: list[int], total: int) -> np.ndarray:
    """Segment ids 0.. for runs of the given lengths, then padding rows (-1) up to `total`."""
    ids = np.repeat(np.arange(len(lengths)), lengths)
    return np.concatenate([ids, np.full(total - ids.size, -1)]).astype(np.int32)


@pytest.mark.parametrize("lengths, total, bound", [
    ([16, 32, 7, 32, 1, 20, 32, 12], 160, 32),  # segments at the bound, straddling blocks, padding at the end
    ([5] * 30, 151, 8),  # N not a multiple of the block; a padding run longer than the block
    ([40, 40, 40, 40], 160, 40),  # every segment exactly one block, aligned
])
def test_banded_equals_dense_on_every_real_row_with_gradients(lengths: list[int], total: int, bound: int) -> None:
    keys = jax.random.split(jax.random.PRNGKey(len(lengths)), 4)
    q = jax.random.normal(keys[0], (1, total, 4, 8))
    k, v = (jax.random.normal(key, (1, total, 2, 8)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape)
    seg = jnp.asarray(contiguous_segments(lengths, total))[None]
    real = (seg >= 0)[..., None, None]
    assert 3 * bound < total  # the banded kernel runs, not the dense fallback

    def loss(q, k, v, max_segment):
        out = attend(q, k, v, segment_mask(seg, max_segment), impl="xla")
        return jnp.sum(jnp.where(real, out, 0) * cotangent), out

    (_, dense), dense_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, 0)
    (_, banded), banded_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, bound)
    rows = np.asarray(seg[0] >= 0)
    np.testing.assert_allclose(np.asarray(banded)[0, rows], np.asarray(dense)[0, rows], atol=2e-6, rtol=1e-5)
    for got, want in zip(banded_grads, dense_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)


def test_banded_attention_compiles_to_a_fraction_of_the_dense_work_and_memory() -> None:
    """32 frames of 256 rows (8192 rows): the band reads 768 keys per query instead of 8192."""
    total, bound = 8192, 256
    q = jax.ShapeDtypeStruct((1, total, 4, 32), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, total), jnp.int32)

    def compiled(max_segment: int):
        fn = jax.jit(lambda q, k, v, s: attend(q, k, v, segment_mask(s, max_segment), impl="xla"))
        return fn.lower(q, q, q, seg).compile()

    dense, banded = compiled(0), compiled(bound)
    flops = [c.cost_analysis()["flops"] for c in (dense, banded)]
    temp = [c.memory_analysis().temp_size_in_bytes for c in (dense, banded)]
    assert flops[1] < flops[0] * (3 * bound / total) * 1.5, flops
    assert temp[1] < temp[0] / 4, temp


def _model(max_frame_rows: int) -> Qwen3VL:
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=256), image_token_id=200,
                              video_token_id=201, vision_start_token_id=202, vision_end_token_id=203)
    return Qwen3VL(cfg.with_runtime(vision_max_frame_rows=max_frame_rows), rngs=nnx.Rngs(5))


GRIDS = [(1, 4, 4), (1, 6, 4), (1, 4, 8), (1, 2, 6), (1, 8, 4)]  # 16 + 24 + 32 + 12 + 32 = 116 patch rows


def test_tiny_model_logits_and_gradients_are_the_same_with_the_bound() -> None:
    dense, banded = _model(0), _model(32)
    nnx.update(banded, nnx.state(dense))  # same weights (same seed already; made explicit)
    ids = R.image_prompt(GRIDS, 200, 202, 203)[None]
    pixels = R.random_pixels(GRIDS, dense.config.vision.patch_dim)
    inputs = [prepare_inputs(m.config, ids, None, pixels, np.asarray(GRIDS), pad_vision_to=128)
              for m in (dense, banded)]

    def loss(model: Qwen3VL, inp) -> jax.Array:
        return jnp.mean(model(inp["input_ids"], inp["positions"], None, inp["vision"]).logits ** 2)

    logits = [np.asarray(m(i["input_ids"], i["positions"], None, i["vision"]).logits)
              for m, i in zip((dense, banded), inputs)]
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    grads = [nnx.grad(loss)(m, i) for m, i in zip((dense, banded), inputs)]
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(a).max() + 1e-12)), *grads)
    assert max(jax.tree.leaves(diffs)) < 1e-4


def test_a_frame_past_the_bound_is_refused_on_the_host_and_poisons_on_the_device() -> None:
    model = _model(24)
    ids = R.image_prompt(GRIDS, 200, 202, 203)[None]
    pixels = R.random_pixels(GRIDS, model.config.vision.patch_dim)
    with pytest.raises(ValueError, match=r"image 2 \(grid \[1, 4, 8\]\) has 32 patch rows.*vision_max_frame_rows=24"):
        prepare_inputs(model.config, ids, None, pixels, np.asarray(GRIDS))
    unchecked = vision_inputs(pixels, np.asarray(GRIDS), model.config.vision, pad_to=128)  # bypasses the check
    assert int(longest_segment(jnp.asarray(unchecked.segment_ids))) == 32
    features, _ = model.visual(unchecked)
    assert np.isnan(np.asarray(features)).all()
    with pytest.raises(ConfigError, match="vision_max_frame_rows"):
        preset("tiny").with_runtime(vision_max_frame_rows=-1).validate()
