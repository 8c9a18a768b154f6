"""The SFT run config: one YAML file per recipe, `a.b.c=value` overrides from the command line.

Sections are frozen dataclasses so that a typo is an error naming the key (not a silently ignored
setting) and a CLI string is coerced by the field's declared type. `data` is passed through untouched:
the data pipeline owns and validates its own dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from flax import nnx

from gsjax.models.qwen3_vl.config import (
    DTYPES,
    PRESETS,
    REMAT_POLICIES,
    ConfigError,
    Qwen3VLConfig,
    RuntimeConfig,
    preset,
)
from gsjax.models.qwen3_vl.model import Qwen3VL
from gsjax.parallel.mesh import MESH_AXES, MeshConfig
from gsjax.parallel.sharding import MeshAxes, Rules, rules_from_config
from gsjax.train.state import OptimizerSettings

# Named freeze lists. `vision` freezes the whole tower; `upstream` reproduces the reference run's
# name-substring freeze, which leaves `visual.pos_embed` and the DeepStack mergers trainable (§4.1).
FREEZE_PRESETS: dict[str, tuple[str, ...]] = {
    "vision": ("visual",),
    "upstream": ("visual.patch_embed", "visual.blocks", "visual.merger"),
    "none": (),
}


class SFTConfigError(ConfigError):
    """An unknown key, a value of the wrong type, or an inconsistent setting; the message names the key."""


@dataclass(frozen=True)
class ModelSection:
    """Which weights (a preset for random init, or an HF directory) and how the model runs."""

    preset: str | None = "tiny"
    hf_dir: str | None = None  # an HF checkpoint directory; wins over `preset` when set
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the trainable weights (fp32 master weights)
    remat: str | tuple[str, ...] = "none"  # one policy, or one per text layer
    vision_remat: str = "none"
    attention_impl: Literal["auto", "xla", "cudnn", "chunked"] = "auto"
    attention_chunk: int = 128  # query block of the "chunked" kernel (CPU): bigger blocks, fewer ops to compile
    moe_impl: Literal["ragged", "dense"] = "ragged"
    # patch rows of the largest image frame (grid h·w; 0: unbounded): the vision attention then costs O(N·rows)
    # instead of O(N²) over the N patch rows of a batch. Images past it are refused with the image named.
    # "auto": the largest frame the run's image pixel budget allows (gsjax/processing/frame_rows.py).
    vision_max_frame_rows: int | Literal["auto"] = 0

    def runtime(self) -> RuntimeConfig:
        rows = self.vision_max_frame_rows
        return RuntimeConfig(param_dtype=self.param_dtype, dtype=self.dtype, attention_impl=self.attention_impl,
                             attention_chunk=self.attention_chunk, moe_impl=self.moe_impl, remat=self.remat,
                             vision_remat=self.vision_remat,
                             vision_max_frame_rows=0 if rows == "auto" else rows)

    def resolve(self, auto_frame_rows: Callable[[Qwen3VLConfig], int] | None = None) -> Qwen3VLConfig:
        """The model config: read from `hf_dir/config.json`, or the named preset, with this runtime.

        `auto_frame_rows(config)` gives the frame bound for `vision_max_frame_rows: auto` (the SFT and GRPO
        configs pass their image budgets' bound: `SFTConfig.model_config`, `GRPOConfig.model_config`)."""
        if self.hf_dir:
            config = Qwen3VLConfig.from_file(self.hf_dir, runtime=self.runtime())
        else:
            config = preset(self.preset or "").with_runtime(**dataclasses.asdict(self.runtime())).validate()
        if self.vision_max_frame_rows == "auto":
            if auto_frame_rows is None:
                raise SFTConfigError("model.vision_max_frame_rows=auto needs the run's image pixel budget: resolve "
                                     "the model through the SFT or GRPO config's model_config()")
            config = config.with_runtime(vision_max_frame_rows=auto_frame_rows(config))
        return config


@dataclass(frozen=True)
class OptimSection:
    """OptimizerSettings minus the step counts, which depend on the data (epochs) and are resolved later."""

    lr: float = 1e-5
    weight_decay: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None  # explicit count; wins over warmup_ratio
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0

    def resolve(self, total_steps: int) -> OptimizerSettings:
        """Warmup as HF Trainer counts it: explicit steps, else ceil(total × ratio)."""
        warmup = self.warmup_steps if self.warmup_steps is not None else math.ceil(total_steps * self.warmup_ratio)
        return OptimizerSettings(lr=self.lr, weight_decay=self.weight_decay, b1=self.b1, b2=self.b2, eps=self.eps,
                                 schedule=self.schedule, warmup_steps=warmup, total_steps=total_steps,
                                 min_lr_ratio=self.min_lr_ratio, grad_clip=self.grad_clip)


@dataclass(frozen=True)
class TrainSection:
    steps: int | None = None  # optimizer updates; exactly one of steps / epochs
    epochs: float | None = None
    grad_accum: int = 1
    freeze: tuple[str, ...] = FREEZE_PRESETS["vision"]  # module-path prefixes, or a FREEZE_PRESETS name
    seed: int = 42
    log_every: int = 1
    checkpoint_every: int = 1000
    keep_checkpoints: int = 30
    async_checkpointing: bool = True
    out_dir: str = "runs/sft"
    export_hf_at_end: bool = True
    tensorboard: bool = True  # only when tensorboardX or torch's writer is importable
    peak_flops_per_device: float | None = None  # for MFU; None: MFU is not reported
    # LM head + cross-entropy over this many positions at a time (0: all at once); bounds the (B, L, V)
    # fp32 logits that dominate activation memory with a 150k vocabulary at long sequences
    logits_chunk: int = 0
    # JAX's persistent compilation cache (None: off): a resumed or repeated run loads its compiled programs
    compile_cache_dir: str | None = None

    def __post_init__(self) -> None:
        # Store the explicit prefix list, so saved configs say exactly what was frozen.
        object.__setattr__(self, "freeze", resolve_freeze(tuple(self.freeze)))

    def total_steps(self, steps_per_epoch: int | None = None) -> int:
        """Optimizer updates in the run; with `epochs`, needs the number of updates per epoch."""
        if self.steps is not None:
            return self.steps
        if not steps_per_epoch or steps_per_epoch <= 0:
            raise SFTConfigError("train.epochs is set: the number of optimizer steps per epoch is needed "
                                 f"(got {steps_per_epoch!r})")
        return max(1, math.ceil(float(self.epochs or 0) * steps_per_epoch))


@dataclass(frozen=True)
class SFTConfig:
    model: ModelSection = field(default_factory=ModelSection)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    rules: tuple[tuple[str, MeshAxes], ...] | None = None  # prepended to DEFAULT_RULES
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived settings
    def sharding_rules(self) -> Rules:
        return rules_from_config(self.rules)

    def optimizer_settings(self, steps_per_epoch: int | None = None) -> OptimizerSettings:
        return self.optim.resolve(self.train.total_steps(steps_per_epoch))

    def model_config(self) -> Qwen3VLConfig:
        """The model config; `model.vision_max_frame_rows: auto` becomes the largest frame an image pre-shrunk
        to data.max_pixels can reach."""
        from gsjax.data.config import SFTDataConfig
        from gsjax.data.loader import image_config_for
        from gsjax.processing.frame_rows import largest_sft_frame

        max_pixels = int(self.data.get("max_pixels", SFTDataConfig.max_pixels))
        return self.model.resolve(lambda config: largest_sft_frame(max_pixels, image_config_for(config, None)))

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SFTConfig:
        return _build(cls, raw, "").validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data (tuples as lists) that `from_dict` reads back to an equal config."""
        return _plain(self)

    def validate(self) -> SFTConfig:
        problems = _problems(self)
        if problems:
            raise SFTConfigError("invalid SFT config:\n  " + "\n  ".join(problems))
        return self


def read_recipe(path: str | Path | None, error: type[Exception] = SFTConfigError) -> dict[str, Any]:
    """A YAML recipe's top-level mapping ({} without a path); `error` names the file when it is not one."""
    if path is None:
        return {}
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except (FileNotFoundError, IsADirectoryError) as e:
        raise error(f"{path}: no such recipe file") from e
    except yaml.YAMLError as e:
        raise error(f"{path} is not valid YAML: {e}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise error(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded or {}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SFTConfig:
    """Read a YAML recipe (or start from defaults) and apply `a.b.c=value` overrides in order."""
    return SFTConfig.from_dict(apply_overrides(read_recipe(path), overrides))


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str], root: type | None = None) -> dict[str, Any]:
    """A copy of `raw` with each `a.b.c=value` set. Values stay strings (coerced later by field type),
    except under free-form dict fields of `root` (default SFTConfig: `data`), where they are parsed as
    YAML scalars/lists."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SFTConfigError(f"override {item!r} is not of the form a.b.c=value")
        parts = key.split(".")
        if any(not p for p in parts):
            raise SFTConfigError(f"override key {key!r} has an empty component")
        parsed: Any = _parse_yaml_value(value, key) if _is_free_form(parts, root or SFTConfig) else value
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SFTConfigError(f"override {key!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = parsed
    return out


# ---------------------------------------------------------------------- building and coercion
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_free_form(parts: Sequence[str], root: type) -> bool:
    """True when the path enters a plain dict field of `root` (no declared types below it)."""
    cls: Any = root
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(cls):
            return False
        hint = _hints(cls).get(part)
        if hint is None:
            return False
        if typing.get_origin(hint) is dict or hint is dict:
            return True
        cls = hint
    return False


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise SFTConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            if close:
                suggestion = f"{where}.{close[0]}" if where else close[0]
                hint = f"; did you mean {suggestion!r}?"
            else:
                hint = f"; known keys: {', '.join(names)}"
            raise SFTConfigError(f"unknown config key {path!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


_NULLS = ("null", "none", "~", "")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """`value` (from YAML, or a CLI string) as the declared type, or an error naming `path`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, path)
    if origin is Literal:
        for option in args:
            if value == option or (isinstance(value, str) and value == str(option)):
                return option
        raise SFTConfigError(f"{path}={value!r} is not one of {list(args)}")
    if hint is Any:
        return value
    if hint is dict or origin is dict:
        if isinstance(value, str):
            value = _parse_yaml_value(value, path)
        if not isinstance(value, Mapping):
            raise SFTConfigError(f"{path} must be a mapping, got {value!r}")
        return _deep_copy(value)
    if origin in (tuple, list):
        return _coerce_sequence(value, origin, args, path)
    if hint is bool:
        return _coerce_bool(value, path)
    if hint is int:
        return _coerce_int(value, path)
    if hint is float:
        return _coerce_float(value, path)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise SFTConfigError(f"{path} must be a string, got {value!r}")
        return str(value)
    raise SFTConfigError(f"{path}: unsupported field type {hint!r}")


def _coerce_union(value: Any, args: tuple, path: str) -> Any:
    if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NULLS)):
        return None
    options = [a for a in args if a is not type(None)]
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):  # a CLI list/mapping, not a string
        value = _parse_yaml_value(value, path)
    # A value already of one option's kind keeps that kind (a str stays a str, not a 1-tuple).
    for option in options:
        base = typing.get_origin(option) or option
        if isinstance(base, type) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
            return _coerce(value, option, path)
    if len(options) == 1:
        return _coerce(value, options[0], path)
    errors = []
    for option in options:
        try:
            return _coerce(value, option, path)
        except SFTConfigError as e:
            errors.append(str(e))
    raise SFTConfigError(f"{path}={value!r} fits none of the allowed types: {'; '.join(errors)}")


def _coerce_sequence(value: Any, origin: type, args: tuple, path: str) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = _parse_yaml_value(text, path)
        else:
            value = [v.strip() for v in text.split(",")] if text else []
    if not isinstance(value, (list, tuple)):
        raise SFTConfigError(f"{path} must be a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple
        if len(value) != len(args):
            raise SFTConfigError(f"{path} must have {len(args)} items, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise SFTConfigError(f"{path} must be true or false, got {value!r}")


def _coerce_int(value: Any, path: str) -> int:
    if isinstance(value, bool):
        raise SFTConfigError(f"{path} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    number: float | None = None
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                number = None
    if number is not None and math.isfinite(number) and number == int(number):
        return int(number)
    raise SFTConfigError(f"{path} must be an integer, got {value!r}")


def _coerce_float(value: Any, path: str) -> float:
    if isinstance(value, bool):
        raise SFTConfigError(f"{path} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise SFTConfigError(f"{path} must be a number, got {value!r}")


def _parse_yaml_value(text: str, path: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SFTConfigError(f"{path}: cannot parse {text!r}: {e}") from e


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep_copy(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return _deep_copy(value) if not isinstance(value, Mapping) else {k: _plain(v) for k, v in value.items()}


# ---------------------------------------------------------------------- validation
def resolve_freeze(freeze: Sequence[str]) -> tuple[str, ...]:
    """A one-item list naming a FREEZE_PRESETS entry expands to its prefixes; anything else is literal."""
    if len(freeze) == 1 and freeze[0] in FREEZE_PRESETS:
        return FREEZE_PRESETS[freeze[0]]
    return tuple(freeze)


def check_freeze(model_config: Qwen3VLConfig, freeze: Sequence[str]) -> None:
    """Every freeze prefix must name at least one parameter: a typo would silently train the tower."""
    abstract = nnx.eval_shape(lambda: Qwen3VL(model_config, rngs=nnx.Rngs(0)))
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
    missing = [f for f in freeze if not any(p == f or p.startswith(f + ".") for p in paths)]
    if missing:
        roots = sorted({p.split(".")[0] for p in paths})
        raise SFTConfigError(f"train.freeze entries {missing} match no parameter (top-level modules: {roots})")


def _problems(c: SFTConfig) -> list[str]:
    out: list[str] = []
    m, o, t = c.model, c.optim, c.train
    if not m.hf_dir:
        if not m.preset:
            out.append("model: set model.preset or model.hf_dir")
        elif m.preset.lower() not in PRESETS:
            out.append(f"model.preset={m.preset!r} is not one of {sorted(PRESETS)}")
    for name in ("dtype", "param_dtype"):
        if getattr(m, name) not in DTYPES:
            out.append(f"model.{name}={getattr(m, name)!r} is not one of {list(DTYPES)}")
    if m.attention_chunk < 1:
        out.append(f"model.attention_chunk must be >= 1, got {m.attention_chunk}")
    for policy in ((m.remat,) if isinstance(m.remat, str) else m.remat) + (m.vision_remat,):
        if policy not in REMAT_POLICIES:
            out.append(f"model remat policy {policy!r} is not one of {list(REMAT_POLICIES)}")

    sizes = {a: getattr(c.mesh, a) for a in MESH_AXES}
    if any(s == 0 or s < -1 for s in sizes.values()) or list(sizes.values()).count(-1) > 1:
        out.append(f"mesh: sizes must be positive or -1 (at most one -1), got {sizes}")
    for i, (name, axes) in enumerate(c.rules or ()):
        listed = () if axes is None else (axes,) if isinstance(axes, str) else axes
        unknown = [a for a in listed if a not in MESH_AXES]
        if unknown:
            out.append(f"rules[{i}] ({name}): mesh axes {unknown} are not among {list(MESH_AXES)}")

    if o.lr <= 0:
        out.append(f"optim.lr must be > 0, got {o.lr}")
    if o.weight_decay < 0:
        out.append(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1) or o.eps <= 0:
        out.append(f"optim: need 0 <= b1, b2 < 1 and eps > 0, got b1={o.b1} b2={o.b2} eps={o.eps}")
    if not 0 <= o.warmup_ratio < 1:
        out.append(f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    if o.warmup_steps is not None and o.warmup_steps < 0:
        out.append(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if not 0 <= o.min_lr_ratio <= 1:
        out.append(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if o.grad_clip < 0:
        out.append(f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}")

    if (t.steps is None) == (t.epochs is None):
        out.append("train: set exactly one of train.steps and train.epochs")
    if t.steps is not None and t.steps <= 0:
        out.append(f"train.steps must be > 0, got {t.steps}")
    if t.epochs is not None and t.epochs <= 0:
        out.append(f"train.epochs must be > 0, got {t.epochs}")
    if t.logits_chunk < 0:
        out.append(f"train.logits_chunk must be >= 0 (0: no chunking), got {t.logits_chunk}")
    for name in ("grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(t, name) < 1:
            out.append(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.peak_flops_per_device is not None and t.peak_flops_per_device <= 0:
        out.append(f"train.peak_flops_per_device must be > 0, got {t.peak_flops_per_device}")
    if not t.out_dir:
        out.append("train.out_dir must not be empty")
    if any(not p or p != p.strip() for p in t.freeze):
        out.append(f"train.freeze has an empty or padded entry: {list(t.freeze)}")
    return out
