"""The policy as the loop sees it: messages in, one assistant turn out.

`Policy` is deliberately narrow (one async method) so a token-in/token-out rollout engine can
implement it later and fill the optional token fields of `PolicyReply`. `OpenAIChatPolicy` reaches
any OpenAI-compatible chat server (SGLang, vLLM, gsjax's own) for inference; images go before the
text of their turn, as in every gsjax path (spec §4.4).
"""

from __future__ import annotations

import base64
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from gsjax.agent.config import PolicyConfig
from gsjax.agent.tools.base import ChatLengthError, ToolError, chat_completion, redact, with_retries

_DATA_URL_CACHE = 256


class PolicyError(Exception):
    """The policy could not produce a turn (after retries)."""


class PolicyLengthError(PolicyError):
    """Prompt plus requested tokens exceed the policy's context: ends the episode as
    `max_response_length_exceeded`."""


@dataclass(frozen=True)
class ImagePart:
    """An image shown to the policy: the exact resized bytes, stored content-addressed."""

    sha256: str
    path: str
    width: int
    height: int
    img_id: str = ""
    source_sha256: str = ""

    def to_record(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "path": self.path, "width": self.width, "height": self.height,
                "img_id": self.img_id, "source_sha256": self.source_sha256}


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant (tool output comes back as user, spec §4.1)
    text: str
    images: tuple[ImagePart, ...] = ()

    def to_record(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.text, "images": [i.to_record() for i in self.images]}


@dataclass(frozen=True)
class PolicyReply:
    text: str
    finish_reason: str  # "stop" or "length" (hit max_tokens)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: tuple[int, ...] | None = None
    logprobs: tuple[float, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Policy(Protocol):
    """Produce the next assistant turn for `messages`, generating at most `max_tokens` tokens."""

    async def complete(self, messages: Sequence[Message], max_tokens: int) -> PolicyReply:
        ...


def image_data_url(path: str) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def to_openai_messages(messages: Sequence[Message], data_url: Any = image_data_url) -> list[dict[str, Any]]:
    """Our messages as OpenAI chat messages; a turn with images becomes [image parts..., text part]."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if not m.images:
            out.append({"role": m.role, "content": m.text})
            continue
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(i.path)}} for i in m.images]
        parts.append({"type": "text", "text": m.text})
        out.append({"role": m.role, "content": parts})
    return out


class OpenAIChatPolicy:
    """Policy over `POST <base_url>/chat/completions` with bounded retries on transient failures."""

    def __init__(self, cfg: PolicyConfig, client: httpx.AsyncClient, rng: random.Random | None = None):
        self.cfg, self.client, self.rng = cfg, client, rng or random.Random()
        self._urls: OrderedDict[str, str] = OrderedDict()

    def _data_url(self, path: str) -> str:
        """Base64 of each image once per recent use: a turn resends the whole history."""
        if path in self._urls:
            self._urls.move_to_end(path)
        else:
            self._urls[path] = image_data_url(path)
            if len(self._urls) > _DATA_URL_CACHE:
                self._urls.popitem(last=False)
        return self._urls[path]

    async def complete(self, messages: Sequence[Message], max_tokens: int) -> PolicyReply:
        payload: dict[str, Any] = {"model": self.cfg.model, "messages": to_openai_messages(messages, self._data_url),
                   "max_tokens": max_tokens, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p}
        what = f"policy {self.cfg.model} at {self.cfg.base_url}"

        async def attempt() -> dict[str, Any]:
            return await chat_completion(self.client, self.cfg.base_url, self.cfg.api_key.reveal(), payload,
                                         self.cfg.retry.request_timeout_s, what)

        secret = [self.cfg.api_key.reveal()]
        try:
            reply = await with_retries(what, attempt, self.cfg.retry, self.rng)
        except ChatLengthError as exc:
            raise PolicyLengthError(redact(str(exc), secret)) from None
        except ToolError as exc:  # a server may echo the bearer token in its error body
            raise PolicyError(redact(str(exc), secret)) from None
        usage = reply["usage"]
        return PolicyReply(text=reply["text"], finish_reason=reply["finish_reason"],
                           prompt_tokens=_count(usage.get("prompt_tokens")),
                           completion_tokens=_count(usage.get("completion_tokens")))


def _count(value: Any) -> int:
    """A usage counter from a server that may send null or junk (then 0, it is only bookkeeping)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
