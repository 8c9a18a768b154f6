"""The SFT run config: recipes load, overrides are coerced by field type, mistakes are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flax import nnx

from gsjax.data.config import SFTDataConfig
from gsjax.models.qwen3_vl.config import preset
from gsjax.models.qwen3_vl.model import Qwen3VL
from gsjax.parallel.sharding import DEFAULT_RULES
from gsjax.train.config import (
    FREEZE_PRESETS,
    SFTConfig,
    SFTConfigError,
    apply_overrides,
    check_freeze,
    load_config,
)
from gsjax.train.state import split_model

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("sft_*.yaml"))  # the SFT recipes
BASE = ["train.steps=10"]


def test_configs_directory_is_not_empty():
    assert len(CONFIGS) >= 3, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(path: Path):
    cfg = load_config(path)
    assert SFTConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()  # savable next to a checkpoint
    settings = cfg.optimizer_settings(steps_per_epoch=100)
    assert settings.total_steps > 0 and 0 <= settings.warmup_steps < settings.total_steps
    data = SFTDataConfig.from_dict(cfg.data)  # the pipeline accepts the section as written
    assert data.cutoff_len == data.length_buckets[-1]


def test_8b_recipe_carries_the_upstream_settings():
    cfg = load_config(Path(CONFIGS[0]).parent / "sft_qwen3vl_8b_8xgpu.yaml")
    o, t, m = cfg.optim, cfg.train, cfg.model
    assert (o.lr, o.weight_decay, o.schedule, o.warmup_ratio, o.grad_clip) == (1e-5, 1e-6, "cosine", 0.02, 1.0)
    assert (t.epochs, t.seed, t.checkpoint_every, t.keep_checkpoints, t.grad_accum) == (2, 42, 1000, 30, 1)
    assert (m.dtype, m.param_dtype) == ("bfloat16", "float32")
    assert cfg.mesh.fsdp == 8 and t.freeze == ("visual",)
    assert cfg.data["cutoff_len"] == 32768 and cfg.data["max_pixels"] == 160000
    # ~10k records on 8 GPUs: 1250 updates per epoch → 2500 steps, 50 warmup (spec §4.1)
    settings = cfg.optimizer_settings(steps_per_epoch=1250)
    assert (settings.total_steps, settings.warmup_steps) == (2500, 50)


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-5\ntrain:\n  steps: 1e3\n")  # YAML 1.1 reads both as strings
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)


def test_overrides_are_coerced_by_field_type():
    cfg = load_config(None, BASE + [
        "optim.lr=3e-4", "optim.warmup_steps=7", "train.async_checkpointing=false", "train.out_dir=007",
        "train.peak_flops_per_device=null", "train.freeze=visual.blocks,visual.merger", "mesh.tensor=2",
        "model.remat=[full,none,dots,full]", "model.attention_impl=chunked",
        "rules=[[embed, [fsdp, tensor]], [vocab, null]]", "data.batch_size=8", "data.sources=[a, b]",
    ])
    assert cfg.optim.lr == 3e-4 and cfg.optim.warmup_steps == 7
    assert cfg.train.async_checkpointing is False
    assert cfg.train.out_dir == "007"  # a string field keeps the text as written
    assert cfg.train.peak_flops_per_device is None
    assert cfg.train.freeze == ("visual.blocks", "visual.merger")
    assert cfg.mesh.tensor == 2
    assert cfg.model.remat == ("full", "none", "dots", "full")
    assert cfg.model.attention_impl == "chunked"
    assert cfg.rules == (("embed", ("fsdp", "tensor")), ("vocab", None))
    assert cfg.sharding_rules()[:2] == cfg.rules and cfg.sharding_rules()[2:] == DEFAULT_RULES
    assert cfg.data == {"batch_size": 8, "sources": ["a", "b"]}
    assert cfg.optimizer_settings().warmup_steps == 7  # explicit steps win over the ratio


def test_overrides_apply_in_order_and_leave_the_input_alone():
    raw = {"train": {"steps": 5}, "data": {"a": {"b": 1}}}
    out = apply_overrides(raw, ["train.steps=6", "train.steps=9", "data.a.c=2"])
    assert out["train"]["steps"] == "9" and out["data"] == {"a": {"b": 1, "c": 2}}
    assert raw == {"train": {"steps": 5}, "data": {"a": {"b": 1}}}


def test_data_section_passes_through_untouched(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 3}\ndata:\n  anything: {nested: [1, 2.5, x]}\n  flag: yes\n")
    assert load_config(path).data == {"anything": {"nested": [1, 2.5, "x"]}, "flag": True}


@pytest.mark.parametrize("name", sorted(FREEZE_PRESETS))
def test_freeze_presets_expand(name: str):
    assert load_config(None, BASE + [f"train.freeze={name}"]).train.freeze == FREEZE_PRESETS[name]


def test_upstream_freeze_keeps_pos_embed_and_deepstack_trainable():
    model = nnx.eval_shape(lambda: Qwen3VL(preset("tiny"), rngs=nnx.Rngs(0)))

    def trainable_vision(freeze_name: str) -> set[str]:
        freeze = load_config(None, BASE + [f"train.freeze={freeze_name}"]).train.freeze
        _, trainable, _ = split_model(model, freeze)
        return {str(path[1]) for path, _ in nnx.to_flat_state(trainable) if path[0] == "visual"}

    assert trainable_vision("upstream") == {"pos_embed", "deepstack_mergers"}
    assert trainable_vision("vision") == set()


def test_check_freeze_names_prefixes_that_match_nothing():
    model = preset("tiny")
    check_freeze(model, FREEZE_PRESETS["upstream"])
    with pytest.raises(SFTConfigError, match=r"visual\.blokcs"):
        check_freeze(model, ("visual.blokcs",))


def test_epochs_need_the_epoch_length():
    cfg = load_config(None, ["train.epochs=2", "optim.warmup_ratio=0.1"])
    with pytest.raises(SFTConfigError, match="steps per epoch"):
        cfg.optimizer_settings()
    settings = cfg.optimizer_settings(steps_per_epoch=45)
    assert (settings.total_steps, settings.warmup_steps) == (90, 9)


def test_model_section_resolves_preset_and_hf_dir(tmp_path: Path):
    cfg = load_config(None, BASE + ["model.dtype=bfloat16", "model.remat=full", "model.attention_chunk=256"])
    model = cfg.model.resolve()
    assert model.text == preset("tiny").text
    assert (model.runtime.dtype, model.runtime.param_dtype, model.runtime.remat) == ("bfloat16", "float32", "full")
    assert model.runtime.attention_chunk == 256
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny-moe").to_hf_dict()))
    from_dir = load_config(None, BASE + [f"model.hf_dir={tmp_path}"]).model.resolve()
    assert from_dir.is_moe and from_dir.text == preset("tiny-moe").text


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.stpes=3"], r"unknown config key 'train\.stpes'; did you mean 'train\.steps'"),
    (["bogus.x=1"], r"unknown config key 'bogus'.*known keys: model, mesh"),
    (["train.steps=abc"], r"train\.steps must be an integer, got 'abc'"),
    (["train.steps=2.5"], r"train\.steps must be an integer"),
    (["train.export_hf_at_end=maybe"], r"train\.export_hf_at_end must be true or false"),
    (["optim.schedule=exp"], r"optim\.schedule='exp' is not one of"),
    (["optim.lr=fast"], r"optim\.lr must be a number"),
    (["train.steps=0"], r"train\.steps must be > 0"),
    (["train.epochs=1"], r"exactly one of train\.steps and train\.epochs"),
    (["train.grad_accum=0"], r"train\.grad_accum must be >= 1"),
    (["optim.warmup_ratio=1.5"], r"optim\.warmup_ratio must be in \[0, 1\)"),
    (["mesh.data=-1"], r"at most one -1"),
    (["model.preset=huge"], r"model\.preset='huge' is not one of"),
    (["model.dtype=float8"], r"model\.dtype='float8'"),
    (["model.attention_chunk=0"], r"model\.attention_chunk must be >= 1, got 0"),
    (["rules=[[embed, model]]"], r"rules\[0\] \(embed\): mesh axes \['model'\]"),
    (["rules=[[embed]]"], r"rules\[0\] must have 2 items"),
    (["train.steps.x=1"], r"train\.steps is a value, not a section"),
    (["train"], r"not of the form a\.b\.c=value"),
    (["train..steps=1"], r"empty component"),
    (["mesh=4"], r"mesh must be a mapping"),
])
def test_errors_name_the_key(overrides: list[str], message: str):
    with pytest.raises(SFTConfigError, match=message):
        load_config(None, BASE + overrides)


def test_several_problems_are_reported_together():
    with pytest.raises(SFTConfigError) as err:
        load_config(None, ["train.steps=-1", "optim.lr=0", "train.keep_checkpoints=0"])
    text = str(err.value)
    assert "train.steps" in text and "optim.lr" in text and "train.keep_checkpoints" in text


def test_bad_yaml_files_are_named(tmp_path: Path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SFTConfigError, match="top level must be a mapping"):
        load_config(listing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {steps: [1\n")
    with pytest.raises(SFTConfigError, match="not valid YAML"):
        load_config(broken)
