"""`gsjax serve-policy CKPT_OR_HF_DIR`: serve the policy over OpenAI chat + SGLang's native API.

Mounted by the top-level CLI as `app.command("serve-policy")(serve_policy)`. Only typer loads at import; JAX,
the sampler, FastAPI and uvicorn load when the command runs. The engine is the embedded `JaxSampler` unless
`--engine module:factory` names another (`factory(path)` must return a `RolloutEngine`), e.g. to serve
a checkpoint format the sampler does not read itself.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gsjax.rollout.engine import RolloutEngine


def load_engine_factory(spec: str) -> Any:
    """`package.module:callable` -> the callable; a bad spec is a `typer.BadParameter` naming it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise typer.BadParameter(f"expected module:factory, got {spec!r}", param_hint="--engine")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise typer.BadParameter(f"cannot load {spec!r}: {exc}", param_hint="--engine") from None
    if not callable(factory):
        raise typer.BadParameter(f"{spec!r} is not callable", param_hint="--engine")
    return factory


def build_engine(path: Path, engine: str | None, *, max_slots: int, max_total_len: int,
                 weight_version: str) -> RolloutEngine:
    from gsjax.rollout.engine import RolloutEngine

    if engine is not None:
        built = load_engine_factory(engine)(str(path))
        if not isinstance(built, RolloutEngine):
            raise typer.BadParameter(f"{engine!r} returned {type(built).__name__}, not a RolloutEngine",
                                     param_hint="--engine")
        return built
    if not (path / "config.json").is_file():
        raise typer.BadParameter(f"{path} has no config.json: the embedded sampler serves HF checkpoint "
                                 "directories (export a training checkpoint to HF first, or pass --engine)",
                                 param_hint="CKPT_OR_HF_DIR")
    from gsjax.rollout.jax_sampler import JaxSampler, SamplerConfig

    try:
        config = SamplerConfig(max_slots=max_slots, max_total_len=max_total_len)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return JaxSampler(path, config, weight_version=weight_version)


def build_app(engine: RolloutEngine, path: Path, *, model_name: str, max_context_tokens: int,
              default_max_tokens: int, tokenizer: Any = None) -> FastAPI:
    """The server app for an engine serving `path`: its tokenizer (else the offline Qwen3-VL one) and its
    image processor settings, if present."""
    from gsjax.processing.images import ImageProcessorConfig
    from gsjax.processing.tokenizer import load_tokenizer
    from gsjax.rollout.server import PolicyServerConfig, create_app

    has_processor = (path / "preprocessor_config.json").is_file()
    image_cfg = ImageProcessorConfig.from_model_dir(path) if has_processor else ImageProcessorConfig()
    try:
        config = PolicyServerConfig(model_name=model_name, model_path=str(path), max_context_tokens=max_context_tokens,
                                    default_max_tokens=default_max_tokens)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return create_app(engine, tokenizer if tokenizer is not None else load_tokenizer(path), image_cfg, config)


def serve_policy(
    ckpt_or_hf_dir: Annotated[Path, typer.Argument(metavar="CKPT_OR_HF_DIR",
                                                   help="HF Qwen3-VL checkpoint directory (or what --engine loads).")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8001,
    model_name: Annotated[str, typer.Option(help="Name reported by /v1/models and in chat replies.")] = "gsjax-policy",
    engine: Annotated[
        str | None, typer.Option(help="module:factory building the RolloutEngine from the path (default: JaxSampler).")
    ] = None,
    max_slots: Annotated[int, typer.Option(help="Sequences the sampler decodes together.")] = 16,
    max_total_len: Annotated[int, typer.Option(help="Context length: prompt + new tokens per request.")] = 8192,
    default_max_tokens: Annotated[int, typer.Option(help="New tokens when a chat request sets none.")] = 4096,
    weight_version: Annotated[str, typer.Option(help="Version name of the weights served at start.")] = "0",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the policy: POST /v1/chat/completions, POST /generate (SGLang), GET /health, weight updates."""
    import uvicorn

    path = ckpt_or_hf_dir.expanduser()
    if not path.is_dir():
        raise typer.BadParameter(f"{path} is not a directory", param_hint="CKPT_OR_HF_DIR")
    if default_max_tokens < 1 or max_total_len < 2 or default_max_tokens >= max_total_len:
        raise typer.BadParameter("need 1 <= --default-max-tokens < --max-total-len")
    served = build_engine(path, engine, max_slots=max_slots, max_total_len=max_total_len,
                          weight_version=weight_version)
    try:
        app = build_app(served, path, model_name=model_name, max_context_tokens=max_total_len,
                        default_max_tokens=default_max_tokens)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        served.close()
