"""The one interface every rollout engine implements (embedded JAX sampler, SGLang sidecar, fakes).

Token-in, token-out: a request carries the exact prompt ids (image pads already expanded, one
`<|image_pad|>` per merged patch) and the images' preprocessed patches; a result carries the exact
sampled ids, the logprob of each under the sampling policy's weights, why generation stopped, and the
weight version that produced it, so the trainer can train on precisely what was sampled and detect
off-policy samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

FinishReason = Literal["stop", "length", "abort"]


class EngineError(RuntimeError):
    """The engine could not serve a request (bad request, server failure, version mismatch)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature == 0 means greedy; top_k <= 0 and top_p >= 1 disable them."""

    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, eq=False)
class ImageInputs:
    """Preprocessed images of one prompt, in prompt order (gsjax.processing / HF processor output)."""

    pixel_values: np.ndarray  # (N patches, C·T·P·P) float32
    image_grid_thw: np.ndarray  # (num_images, 3) int
    encoded: tuple[bytes, ...] = ()  # the same images as encoded files, for engines that preprocess themselves


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    input_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    images: ImageInputs | None = None
    request_id: str = ""


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    output_ids: tuple[int, ...]
    # log-softmax of the raw logits (T = 1, before top-k/top-p) at each sampled id: what the trainer recomputes
    logprobs: tuple[float, ...]
    finish_reason: FinishReason
    weight_version: str
    prompt_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    """Generate from token ids and accept new weights. Engines batch concurrent `generate` calls."""

    @property
    def weight_version(self) -> str: ...

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def update_weights(self, params: Any, version: str) -> None:
        """`params`: an nnx.State of the policy's params (same graph as the engine's model) or an HF dir."""

    def close(self) -> None: ...
