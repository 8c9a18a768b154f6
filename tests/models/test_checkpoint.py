"""HF checkpoint ⇄ gsjax: bit-exact round trips, layouts, sharded indexes, and errors that name the key."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from gsjax.models.qwen3_vl import reference as R
from gsjax.models.qwen3_vl.checkpoint import CheckpointError, export_hf, load_hf
from gsjax.models.qwen3_vl.config import RuntimeConfig
from gsjax.models.qwen3_vl.model import prepare_inputs
from gsjax.models.safetensors_io import CheckpointReader, write_safetensors

from .conftest import GRIDS, VARIANTS


def _all_tensors(directory) -> dict[str, np.ndarray]:
    reader = CheckpointReader(directory)
    return {k: np.asarray(reader.get(k)) for k in reader.keys()}


def _assert_bit_exact(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


def _to_hub_layout(src, dst, layers: int) -> None:
    """Rewrite a transformers-5.x-saved MoE checkpoint with hub-layout experts (as released on the hub)."""
    shutil.copytree(src, dst)
    tensors = _all_tensors(src)
    for layer in range(layers):
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.language_model.layers.{layer}.mlp.experts.{name}"
            tensors[key] = np.ascontiguousarray(tensors[key].transpose(0, 2, 1))
    write_safetensors(dst / "model.safetensors", tensors)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_roundtrip_is_bit_exact(variant, hf_dirs, gs_models, tmp_path):
    source = hf_dirs[variant]
    out = export_hf(gs_models[variant], tmp_path / "export")
    original = _all_tensors(source)
    if variant == "moe":  # transformers 5.x saved its transposed layout; gsjax writes the hub layout
        _to_hub_layout(source, tmp_path / "hub", 4)
        original = _all_tensors(tmp_path / "hub")
    _assert_bit_exact(original, _all_tensors(out))


def test_bf16_checkpoint_roundtrip_through_fp32_params(tmp_path):
    src = R.build_tiny_hf(tmp_path / "bf16", dtype="bfloat16", seed=5)
    model = load_hf(src)  # bf16 on disk, fp32 params
    assert str(model.embed_tokens[...].dtype) == "float32"
    out = export_hf(model, tmp_path / "out", dtype="bfloat16")
    _assert_bit_exact(_all_tensors(src), _all_tensors(out))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("variant", ["dense-tied", "moe"])
def test_transformers_loads_the_export_with_equal_logits(variant, gs_models, tmp_path):
    out = export_hf(gs_models[variant], tmp_path / "export")
    hf = R.load_hf_model(out)
    model = gs_models[variant]
    ids = R.image_prompt(GRIDS, 200, 202, 203)[None]
    pv = R.random_pixels(GRIDS, model.config.vision.patch_dim)
    inp = prepare_inputs(model.config, ids, None, pv, np.asarray(GRIDS))
    ours = np.asarray(model(inp["input_ids"], inp["positions"], None, inp["vision"]).logits)
    ref = R.hf_logits(hf, ids, None, inp["positions"], pv, np.asarray(GRIDS))
    assert np.abs(ours - ref).max() <= 1e-5


def test_hub_layout_moe_loads_like_v5_layout(hf_dirs, gs_models, tmp_path):
    _to_hub_layout(hf_dirs["moe"], tmp_path / "hub", 4)
    hub = load_hf(tmp_path / "hub")
    ids = np.array([[3, 4, 5, 6, 7]])
    inp = prepare_inputs(hub.config, ids)
    a = hub(inp["input_ids"], inp["positions"]).logits
    b = gs_models["moe"](inp["input_ids"], inp["positions"]).logits
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sharded_export_and_load(gs_models, tmp_path):
    out = export_hf(gs_models["dense"], tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_hf(out)
    ids = np.array([[1, 2, 3, 4]])
    inp = prepare_inputs(again.config, ids)
    assert np.array_equal(np.asarray(again(inp["input_ids"], inp["positions"]).logits),
                          np.asarray(gs_models["dense"](inp["input_ids"], inp["positions"]).logits))


def test_load_to_bfloat16_params(hf_dirs):
    model = load_hf(hf_dirs["dense"], runtime=RuntimeConfig(param_dtype="bfloat16", dtype="bfloat16"))
    assert str(model.layers[0].self_attn.q_proj[...].dtype) == "bfloat16"


def _mutate(src, dst, fn):
    shutil.copytree(src, dst)
    tensors = _all_tensors(src)
    fn(tensors)
    write_safetensors(dst / "model.safetensors", tensors)
    return dst


def test_errors_name_the_key(hf_dirs, tmp_path):
    src = hf_dirs["dense"]
    key = "model.language_model.layers.2.self_attn.k_proj.weight"
    missing = _mutate(src, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.2\.self_attn\.k_proj\.weight"):
        load_hf(missing)
    extra = _mutate(src, tmp_path / "extra", lambda t: t.__setitem__("model.language_model.bogus", t[key]))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*bogus"):
        load_hf(extra)
    wrong = _mutate(src, tmp_path / "wrong", lambda t: t.__setitem__(key, t[key][:-1]))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape \(47, 64\), expected \(48, 64\)"):
        load_hf(wrong)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "empty")


def test_ambiguous_expert_layout_is_refused(tmp_path):
    src = R.build_tiny_hf(tmp_path / "amb", moe=True, text={"moe_intermediate_size": 32})  # H = 2I = 64
    with pytest.raises(CheckpointError, match="cannot be told apart"):
        load_hf(src)
