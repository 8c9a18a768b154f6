"""The image server's wire format (agent.md §6.1): one schema shared by the server, the client and any
drop-in backend, so a request the client builds is validated by the same rules the server applies.
Field names and defaults are upstream's; gsjax changes are noted per field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**63 - 1


class GenerationOptions(BaseModel):
    """The knobs of one generation besides the prompt and the references. Unknown fields are an error
    (HTTP 422 at the server), so a misspelt option is never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, le=MAX_SEED)
    true_cfg_scale: float = Field(4.0, ge=0.0)
    negative_prompt: str = " "
    num_inference_steps: int = Field(40, ge=1, le=1000)
    guidance_scale: float = Field(1.0, ge=0.0)
    num_images_per_prompt: int = Field(1, ge=1, le=8)
    height: int | None = Field(None, ge=16, le=8192, description="gsjax extension; unset = pipeline default")
    width: int | None = Field(None, ge=16, le=8192, description="gsjax extension; unset = pipeline default")


class GenerationParams(GenerationOptions):
    """What one pipeline call gets: the options plus the prompt (reference images travel separately)."""

    prompt: str


class GenerateRequest(GenerationParams):
    """`POST /generate` body."""

    image_urls: list[str] = Field(
        default_factory=list,
        description="`data:image/<fmt>;base64,...` or http(s) URLs. Optional in gsjax (upstream required it "
        "and crashed on null): empty means text-only, if the served pipeline supports it.",
    )

    @field_validator("image_urls", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return [] if value is None else value

    def params(self) -> GenerationParams:
        """The pipeline inputs of this request, without the (possibly large) image URLs."""
        return GenerationParams.model_validate(self.model_dump(exclude={"image_urls"}))


class GenerateSuccess(BaseModel):
    """`image` is a base64 PNG with no `data:` prefix; `images` (gsjax) holds all of them when
    `num_images_per_prompt` > 1."""

    success: Literal[True] = True
    image: str
    images: list[str] | None = None


class GenerateFailure(BaseModel):
    """An inference exception: HTTP 200 with `success: false` (upstream behaviour)."""

    success: Literal[False] = False
    message: str


class HealthResponse(BaseModel):
    """`GET /health`. `status` is `unhealthy` (with `reason`) while no pipeline is loaded; `queued` and
    `devices` are gsjax additions."""

    status: Literal["healthy", "unhealthy"]
    num_gpus: int | None = None
    disabled_gpus: list[int] | None = None
    reason: str | None = None
    queued: int | None = None
    devices: list[dict[str, object]] | None = None
