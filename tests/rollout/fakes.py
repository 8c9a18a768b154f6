"""A deterministic in-process `RolloutEngine` for server, client and policy tests (no model, no JAX).

Replies come from a script: a list of id lists used in turn (the last one repeats), or a function of the
request. The engine applies the request's stop ids and max_tokens like a real one, so finish reasons and
usage counts are honest, and gives each sampled id a logprob that is a pure function of (position, id).
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gsjax.processing.images import ImageProcessorConfig
from gsjax.processing.tokens import IM_END_ID
from gsjax.rollout.engine import EngineError, GenerationRequest, GenerationResult

Script = Sequence[Sequence[int]] | Callable[[GenerationRequest], Sequence[int]]

SMALL_IMAGES = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 64 * 4)
"""Image processing small enough for fast tests (a few dozen image tokens)."""


def png_bytes(width: int = 70, height: int = 50, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def fake_logprob(position: int, token: int) -> float:
    return -round(0.01 * (position + 1) + (token % 7) / 100, 6)


def default_reply(request: GenerationRequest) -> list[int]:
    """Eight ordinary word-piece ids that depend on the prompt, then `<|im_end|>`."""
    base = sum(request.input_ids) % 400
    return [1000 + (base + 13 * i) % 400 for i in range(8)] + [IM_END_ID]


def agent_turn(request: GenerationRequest) -> tuple[str, int, int]:
    """(prompt id, rollout index, turn) of a GRPO agent episode's request, whose id reads
    `<prompt id>-<rollout index>-t<turn>`: scripts that reply by episode and turn."""
    episode, turn = request.request_id.rsplit("-t", 1)
    prompt_id, index = episode.rsplit("-", 1)
    return prompt_id, int(index), int(turn)


def turn_ids(tokenizer: Any, text: str) -> list[int]:
    """A scripted model turn as the engine returns it: the text's ids, then `<|im_end|>`."""
    return list(tokenizer.encode(text, add_special_tokens=False)) + [IM_END_ID]


class FakeEngine:
    def __init__(self, script: Script | None = None, version: str = "v0", delay_s: float = 0.0):
        self.script = script
        self.version = version
        self.delay_s = delay_s
        self.requests: list[GenerationRequest] = []
        self.updates: list[tuple[Any, str]] = []
        self.fail_updates = 0
        self.hold: asyncio.Event | None = None  # when set to an Event, generation waits for it
        self.closed = False
        self._turn = 0

    @property
    def weight_version(self) -> str:
        return self.version

    def _reply(self, request: GenerationRequest) -> list[int]:
        if self.script is None:
            return default_reply(request)
        if callable(self.script):
            return list(self.script(request))
        reply = self.script[min(self._turn, len(self.script) - 1)]
        self._turn += 1
        return list(reply)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.closed:
            raise EngineError("engine closed")
        self.requests.append(request)
        if self.hold is not None:
            await self.hold.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        reply = self._reply(request)
        out: list[int] = []
        finish = "length"
        for token in reply[: request.params.max_tokens]:
            out.append(token)
            if token in request.params.stop_token_ids:
                finish = "stop"
                break
        else:
            if len(reply) < request.params.max_tokens:
                finish = "stop"  # the script ran out: an end of generation without a stop id
        return GenerationResult(request_id=request.request_id, output_ids=tuple(out),
                                logprobs=tuple(fake_logprob(i, t) for i, t in enumerate(out)), finish_reason=finish,
                                weight_version=self.version, prompt_tokens=len(request.input_ids))

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    def update_weights(self, params: Any, version: str) -> None:
        if self.fail_updates:
            self.fail_updates -= 1
            raise EngineError(f"cannot load {params}")
        if isinstance(params, (str, Path)) and not Path(params).is_dir():
            raise EngineError(f"{params} is not a directory")
        self.updates.append((params, version))
        self.version = version

    def close(self) -> None:
        self.closed = True


def write_hf_dir(path: Path, value: float = 1.0) -> Path:
    """A minimal HF-layout weight directory (config.json + one bf16-sized safetensors file)."""
    from gsjax.models.safetensors_io import write_safetensors

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "fake"}')
    write_safetensors(path / "model.safetensors", {"w": np.full((4, 4), value, np.float32)}, metadata={"format": "pt"})
    return path


def fake_engine_factory(path: str) -> FakeEngine:
    """An `--engine module:factory` target for the serve-policy CLI tests."""
    return FakeEngine(version=f"loaded:{Path(path).name}")
