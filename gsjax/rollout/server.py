"""The policy HTTP server over any `RolloutEngine`: OpenAI chat and SGLang's native API on one port.

Clients cannot tell it from an SGLang server for what gsjax uses: `/v1/chat/completions` (images as data URLs),
`/generate` (token ids + images in; ids, logprobs, finish reason, weight version out), `/health`,
`/get_model_info`, `/get_weight_version`, and the weight-sync set `/pause_generation`, `/flush_cache`,
`/update_weights_from_disk`, `/continue_generation`, with SGLang's request and response shapes. So the agent,
external eval clients and `SGLangEngine` (with its weight syncer) work against either server unchanged.

Pausing is SGLang's `in_place` behaviour whatever mode is asked: the engine interface cannot abort a
running generation, so requests already inside the engine finish and new ones wait at a gate. A weight
update closes the gate itself and waits for the engine to drain, so no request ever straddles two versions.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from gsjax.processing.images import ImageProcessorConfig
from gsjax.processing.tokens import STOP_TOKEN_IDS
from gsjax.rollout.engine import EngineError, GenerationRequest, GenerationResult, RolloutEngine, SamplingParams
from gsjax.rollout.openai_chat import (
    ContextLengthError,
    RequestError,
    cut_at_stop,
    decode_data_url,
    encode_openai_chat,
    expand_image_pads,
    image_inputs,
    image_token_counts,
    single_token_stops,
    stop_list,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PolicyServerConfig:
    """Limits and names. `max_context_tokens` bounds prompt + max_tokens (a 400 naming the limit beyond)."""

    model_name: str = "gsjax-policy"
    model_path: str = ""
    max_context_tokens: int = 65_536
    default_max_tokens: int = 4096
    max_images_per_request: int = 64
    max_image_bytes: int = 32 * 2**20
    max_decoded_pixels: int = 50_000_000
    drain_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_context_tokens < 2 or self.default_max_tokens < 1:
            raise ValueError("max_context_tokens must be >= 2 and default_max_tokens >= 1")


# --------------------------------------------------------------------------- request bodies


class ChatCompletionBody(BaseModel):
    """The OpenAI fields the server honours; unknown fields are ignored like OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    skip_special_tokens: bool = True


class GenerateBody(BaseModel):
    """SGLang's `GenerateReqInput`, single request: `input_ids` (or `text`) + optional `image_data`."""

    model_config = ConfigDict(extra="ignore")

    input_ids: list[int] | None = None
    text: str | None = None
    image_data: str | list[str] | None = None
    sampling_params: dict[str, Any] | None = None
    return_logprob: bool = False
    return_text_in_logprobs: bool = False
    rid: str | None = None
    stream: bool = False


class UpdateWeightsFromDiskBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None


# SGLang sampling keys accepted at their neutral value only (anything else would silently change sampling),
# and keys that only shape the returned text.
_NEUTRAL_SAMPLING = {"frequency_penalty": 0, "presence_penalty": 0, "repetition_penalty": 1, "min_new_tokens": 0,
                     "n": 1, "logit_bias": {}}
_TEXT_ONLY_SAMPLING = ("no_stop_trim", "spaces_between_special_tokens")
_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "sampling_seed",
                  "seed", "ignore_eos", "skip_special_tokens"}


# --------------------------------------------------------------------------- the service


class PolicyService:
    """The engine plus the pause gate, the in-flight count, the weight-update lock and the tokenizer lock
    (HF fast tokenizers are not safe to call from several threads at once)."""

    def __init__(self, engine: RolloutEngine, tokenizer: Any, image_cfg: ImageProcessorConfig,
                 config: PolicyServerConfig):
        self.engine, self.tokenizer, self.image_cfg, self.config = engine, tokenizer, image_cfg, config
        self._open = asyncio.Event()
        self._open.set()
        self._user_paused = False
        self._in_flight = 0
        self._drained = asyncio.Condition()
        self._update_lock = asyncio.Lock()
        self._tokenizer_lock = threading.Lock()

    async def with_tokenizer(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizer (and image) work in a worker thread, one tokenizer user at a time."""
        def locked() -> T:
            with self._tokenizer_lock:
                return fn(*args, **kwargs)

        return await asyncio.to_thread(locked)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        await self._open.wait()
        self._in_flight += 1
        try:
            return await self.engine.generate(request)
        finally:
            self._in_flight -= 1
            async with self._drained:
                self._drained.notify_all()

    def pause(self) -> None:
        self._user_paused = True
        self._open.clear()

    def resume(self) -> None:
        self._user_paused = False
        if not self._update_lock.locked():
            self._open.set()

    async def _drain(self) -> None:
        async with self._drained:
            await asyncio.wait_for(self._drained.wait_for(lambda: self._in_flight == 0), self.config.drain_timeout_s)

    async def update_from_disk(self, model_path: str, version: str | None) -> tuple[bool, str]:
        """Load an HF directory into the engine with no request in flight; (success, message)."""
        path = Path(model_path)
        if not path.is_dir():
            return False, f"model_path {model_path!r} is not a directory"
        version = version or path.name
        async with self._update_lock:
            self._open.clear()
            try:
                await self._drain()
                await asyncio.to_thread(self.engine.update_weights, path, version)
            except TimeoutError:
                return False, f"requests still running after {self.config.drain_timeout_s} s; weights not updated"
            except Exception as exc:  # the engine keeps serving its old weights; the client decides what next
                log.exception("weight update from %s failed", model_path)
                return False, f"failed to load weights from {model_path}: {type(exc).__name__}: {exc}"
            finally:
                if not self._user_paused:
                    self._open.set()
        served = self.engine.weight_version
        if served != version:
            return False, f"engine reports weight version {served!r} after loading {version!r}"
        return True, f"Succeeded to update model weights. Weight version updated to {version}."


def _error(status: int, message: str) -> JSONResponse:
    """SGLang's / OpenAI's error body."""
    return JSONResponse({"object": "error", "message": message, "type": "BadRequestError" if status < 500 else
                         "InternalServerError", "param": None, "code": status}, status_code=status)


def _finish_json(result: GenerationResult, output_ids: Sequence[int], stop_ids: Sequence[int],
                 matched_str: str | None) -> dict[str, Any]:
    """SGLang's `meta_info.finish_reason` object."""
    if matched_str is not None:
        return {"type": "stop", "matched": matched_str}
    if result.finish_reason == "stop":
        last = output_ids[-1] if output_ids else None
        return {"type": "stop", "matched": last if last in stop_ids else None}
    if result.finish_reason == "length":
        return {"type": "length", "length": len(output_ids)}
    return {"type": "abort", "message": str(result.extra.get("message", "aborted"))}


def _check_context(prompt_tokens: int, max_tokens: int, limit: int) -> None:
    if prompt_tokens + max_tokens > limit:
        raise ContextLengthError(prompt_tokens, max_tokens, limit)


def _sglang_sampling(raw: dict[str, Any] | None, tokenizer: Any) -> tuple[SamplingParams, list[str], bool]:
    """SGLang `sampling_params` -> (engine params, stop strings, skip_special_tokens). SGLang's defaults:
    128 new tokens, temperature 1, the model's stop tokens unless `ignore_eos`."""
    raw = dict(raw or {})
    for key, neutral in _NEUTRAL_SAMPLING.items():
        value = raw.pop(key, None)
        if value is not None and value != neutral:
            raise RequestError(f"sampling_params.{key}={value!r} is not supported (only {neutral!r})")
    for key in _TEXT_ONLY_SAMPLING:
        raw.pop(key, None)
    unknown = sorted(set(raw) - _SAMPLING_KEYS)
    if unknown:
        raise RequestError(f"unsupported sampling_params {unknown}")
    stops = stop_list(raw.get("stop"))
    stop_ids = list(raw.get("stop_token_ids") or [])
    if not raw.get("ignore_eos", False):
        stop_ids += STOP_TOKEN_IDS
    stop_ids += single_token_stops(stops, tokenizer)
    seed = raw.get("sampling_seed", raw.get("seed"))
    try:
        params = SamplingParams(max_tokens=int(raw.get("max_new_tokens", 128)),
                                temperature=float(raw.get("temperature", 1.0)), top_p=float(raw.get("top_p", 1.0)),
                                top_k=int(raw.get("top_k", -1)), stop_token_ids=tuple(dict.fromkeys(stop_ids)),
                                seed=None if seed is None else int(seed))
    except (TypeError, ValueError) as exc:
        raise RequestError(f"bad sampling_params: {exc}") from None
    return params, stops, bool(raw.get("skip_special_tokens", True))


# --------------------------------------------------------------------------- the app


def create_app(engine: RolloutEngine, tokenizer: Any, image_cfg: ImageProcessorConfig | None = None,
               config: PolicyServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. The caller owns the engine (and closes it after the server stops)."""
    config = config or PolicyServerConfig()
    service = PolicyService(engine, tokenizer, image_cfg or ImageProcessorConfig(), config)
    app = FastAPI(title="gsjax policy server")
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:  # 400 like SGLang, not 422
        return _error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(RequestError)
    async def _bad(_: Request, exc: RequestError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(EngineError)
    async def _engine_failed(_: Request, exc: EngineError) -> JSONResponse:
        log.error("engine error: %s", exc)
        return _error(500, f"engine error: {exc}")

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "weight_version": engine.weight_version}

    @app.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        return {"model_path": config.model_path, "tokenizer_path": config.model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": engine.weight_version,
                "served_model_name": config.model_name, "max_context_tokens": config.max_context_tokens}

    @app.get("/get_weight_version")
    async def weight_version() -> dict[str, Any]:
        return {"weight_version": engine.weight_version}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "gsjax",
                "root": config.model_name, "max_model_len": config.max_context_tokens}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody) -> dict[str, Any]:
        return await _chat(service, body)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(body: GenerateBody) -> dict[str, Any]:
        return await _generate(service, body)

    @app.post("/pause_generation")
    async def pause_generation() -> dict[str, Any]:
        service.pause()
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def continue_generation() -> dict[str, Any]:
        service.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> PlainTextResponse:
        busy = service.in_flight > 0  # SGLang refuses to flush with requests running; so do we
        text = "Cache not flushed: requests are running.\n" if busy else "Cache flushed.\n"
        return PlainTextResponse(text, status_code=400 if busy else 200)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(body: UpdateWeightsFromDiskBody) -> JSONResponse:
        ok, message = await service.update_from_disk(body.model_path, body.weight_version)
        return JSONResponse({"success": ok, "message": message, "num_paused_requests": 0},
                            status_code=200 if ok else 400)

    return app


async def _chat(service: PolicyService, body: ChatCompletionBody) -> dict[str, Any]:
    if body.stream:
        raise RequestError("stream=true is not supported by this server")
    if body.n != 1:
        raise RequestError("only n=1 is supported")
    if body.top_logprobs:
        raise RequestError("top_logprobs is not supported")
    cfg, tokenizer = service.config, service.tokenizer
    encoded = await service.with_tokenizer(encode_openai_chat, body.messages, tokenizer, service.image_cfg,
                                           tools=body.tools, max_images=cfg.max_images_per_request,
                                           max_image_bytes=cfg.max_image_bytes,
                                           max_decoded_pixels=cfg.max_decoded_pixels)
    max_tokens = body.max_completion_tokens or body.max_tokens or min(
        cfg.default_max_tokens, max(1, cfg.max_context_tokens - len(encoded.input_ids)))
    _check_context(len(encoded.input_ids), max_tokens, cfg.max_context_tokens)
    stops = stop_list(body.stop)
    single = await service.with_tokenizer(single_token_stops, stops, tokenizer)
    stop_ids = tuple(dict.fromkeys([*STOP_TOKEN_IDS, *(body.stop_token_ids or []), *single]))
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, stop_token_ids=stop_ids, seed=body.seed)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    result = await service.generate(GenerationRequest(encoded.input_ids, params, encoded.images, request_id))
    kept, text, matched = await service.with_tokenizer(cut_at_stop, result.output_ids, tokenizer, stops,
                                                       body.skip_special_tokens)
    finish = "stop" if matched is not None else result.finish_reason
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": finish, "matched_stop": _finish_json(
                                  result, result.output_ids, stop_ids, matched).get("matched")}
    if body.logprobs:
        content = await service.with_tokenizer(_token_logprobs, tokenizer, result.output_ids[:kept],
                                               result.logprobs[:kept])
        choice["logprobs"] = {"content": content}
    prompt_tokens = len(encoded.input_ids)
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": body.model or service.config.model_name, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": kept, "total_tokens": prompt_tokens + kept},
            "metadata": {"weight_version": result.weight_version}}


def _token_logprobs(tokenizer: Any, ids: Sequence[int], logprobs: Sequence[float]) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content`: each sampled token's text, logprob and UTF-8 bytes."""
    out = []
    for token_id, logprob in zip(ids, logprobs):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        out.append({"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")), "top_logprobs": []})
    return out


async def _generate(service: PolicyService, body: GenerateBody) -> dict[str, Any]:
    if body.stream:
        raise RequestError("stream=true is not supported by this server")
    tokenizer, cfg = service.tokenizer, service.config
    if (body.input_ids is None) == (body.text is None):
        raise RequestError("give exactly one of input_ids or text (batches are not supported)")
    if body.input_ids is not None:
        ids = list(body.input_ids)
    else:
        ids = list(await service.with_tokenizer(tokenizer.encode, body.text, add_special_tokens=False))
    urls = [body.image_data] if isinstance(body.image_data, str) else list(body.image_data or [])
    if len(urls) > cfg.max_images_per_request:
        raise RequestError(f"more than {cfg.max_images_per_request} images in one request")
    images = None
    if urls:
        encoded = [decode_data_url(u, cfg.max_image_bytes) for u in urls]
        images = await asyncio.to_thread(image_inputs, encoded, service.image_cfg, cfg.max_decoded_pixels)
        ids = expand_image_pads(ids, image_token_counts(images.image_grid_thw, service.image_cfg))
    elif any(t < 0 for t in ids):
        raise RequestError("input_ids must be non-negative")
    if not ids:
        raise RequestError("the prompt is empty")
    params, stops, skip_special = await service.with_tokenizer(_sglang_sampling, body.sampling_params, tokenizer)
    _check_context(len(ids), params.max_tokens, cfg.max_context_tokens)
    rid = body.rid or uuid.uuid4().hex
    result = await service.generate(GenerationRequest(tuple(ids), params, images, rid))
    kept, text, matched = await service.with_tokenizer(cut_at_stop, result.output_ids, tokenizer, stops, skip_special)
    output_ids = list(result.output_ids[:kept])
    finish = _finish_json(result, output_ids, params.stop_token_ids, matched)
    meta: dict[str, Any] = {"id": rid, "finish_reason": finish, "prompt_tokens": len(ids),
                            "completion_tokens": len(output_ids), "cached_tokens": 0,
                            "weight_version": result.weight_version}
    if body.return_logprob:
        texts: list[str | None] = [None] * len(output_ids)
        if body.return_text_in_logprobs:
            texts = await service.with_tokenizer(lambda: [tokenizer.decode([t]) for t in output_ids])
        meta["output_token_logprobs"] = [[lp, tok, txt] for tok, lp, txt in
                                         zip(output_ids, result.logprobs[:kept], texts)]
    return {"text": text, "output_ids": output_ids, "meta_info": meta}
