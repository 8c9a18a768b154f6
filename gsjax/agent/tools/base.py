"""What every tool shares: the interface, typed errors, bounded retries, HTTP fetch helpers, the
URL guard and secret redaction.

A tool turns normalised arguments into a `ToolOutput`. Failures are typed `ToolError`s so the loop
can tell the model exactly what went wrong (never a silent empty result, unlike upstream's image
search) and so error text never flows into another model as if it were page content (§8 item 14).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx

from gsjax import httputil
from gsjax.agent.config import RetryConfig
from gsjax.agent.images import ImageStore
from gsjax.agent.protocol import ToolArgumentError
from gsjax.errors import InputError

T = TypeVar("T")

# --------------------------------------------------------------------------- typed errors


class ToolError(Exception):
    """A tool call that could not produce a result; the message is shown to the model."""

    code = "tool_error"
    retryable = False


class ToolConfigError(InputError, ToolError):
    code, retryable = "tool_config", False


class ToolHTTPError(ToolError):
    code = "http_error"

    def __init__(self, what: str, status: int, detail: str = ""):
        self.status = status
        self.retryable = status == 429 or status >= 500
        super().__init__(f"{what}: HTTP {status}" + (f" ({detail})" if detail else ""))


class ToolTimeout(ToolError):
    code, retryable = "timeout", True


class ToolConnectionError(ToolError):
    code, retryable = "connection_error", True


class ToolBadResponse(ToolError):
    """A 200 whose body is not what the protocol promises (garbage JSON, an error object)."""

    code, retryable = "bad_response", True


class ToolRefused(ToolError):
    """The URL guard refused a target (non-http(s), loopback, private, link-local, ...)."""

    code, retryable = "refused", False


class ToolTooLarge(ToolError):
    code, retryable = "too_large", False


class NotAnImage(ToolError):
    code, retryable = "not_an_image", False


class RetriesExhausted(ToolError):
    """Every allowed attempt failed; keeps the last error's code so records stay specific."""

    retryable = False

    def __init__(self, what: str, last: ToolError, attempts: int):
        self.last, self.attempts, self.code = last, attempts, last.code
        super().__init__(f"{what} failed after {attempts} attempt(s): {last}")


class CacheMiss(ToolError):
    """Strict replay found no recorded entry: the run is not reproducible from this cache."""

    code, retryable = "cache_miss", False


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ImageHit:
    """One stored image-search result; the bytes live in the episode's ImageStore under sha256."""

    title: str
    url: str
    page_url: str
    sha256: str

    def to_record(self) -> dict[str, str]:
        return {"title": self.title, "url": self.url, "page_url": self.page_url, "sha256": self.sha256}


@dataclass(frozen=True)
class ToolOutput:
    """What a tool returns. `text` is the body the model reads (for image search: the text shown
    when there are no hits, e.g. an empty-result advice or an error); `notes` are partial failures
    that the model is told about next to the results."""

    text: str
    hits: tuple[ImageHit, ...] = ()
    error: str | None = None
    error_code: str | None = None
    notes: tuple[str, ...] = ()

    def to_record(self) -> dict[str, Any]:
        return {"text": self.text, "hits": [h.to_record() for h in self.hits], "error": self.error,
                "error_code": self.error_code, "notes": list(self.notes)}

    @staticmethod
    def from_record(rec: Mapping[str, Any]) -> ToolOutput:
        return ToolOutput(text=rec["text"], hits=tuple(ImageHit(**h) for h in rec.get("hits", [])),
                          error=rec.get("error"), error_code=rec.get("error_code"),
                          notes=tuple(rec.get("notes", [])))

    @staticmethod
    def failure(text: str, exc: BaseException) -> ToolOutput:
        return ToolOutput(text=text, error=str(exc), error_code=getattr(exc, "code", type(exc).__name__))


@dataclass
class ToolContext:
    """Per-call state handed to a tool: where this episode keeps its images."""

    store: ImageStore


class Tool(Protocol):
    """A tool the model can call. `parse_args` is pure; `run` does the I/O."""

    name: str
    backend: str

    def schema(self) -> dict[str, Any]:
        """The `{"type": "function", "function": {...}}` object advertised in the system prompt."""

    def parse_args(self, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Validated, normalised arguments and the names of ignored extra keys (§8 item 13)."""

    def cache_fields(self) -> dict[str, Any]:
        """Backend settings that change results (e.g. the summary model) and so belong in cache keys."""

    async def run(self, args: Mapping[str, Any], ctx: ToolContext) -> ToolOutput:
        """Execute; expected failures come back as a ToolOutput with `error` set, not as exceptions."""


def function_schema(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


# --------------------------------------------------------------------------- argument checking (pure)


def split_known(tool: str, raw: Mapping[str, Any], allowed: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    allowed = set(allowed)
    known = {k: v for k, v in raw.items() if k in allowed}
    return known, sorted(str(k) for k in raw if k not in allowed)


def require_str(tool: str, args: Mapping[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = args.get(key)
    if not isinstance(value, str):
        raise ToolArgumentError(tool, f'"{key}" must be a string, got {type(value).__name__}')
    if not allow_empty and not value.strip():
        raise ToolArgumentError(tool, f'"{key}" must not be empty')
    return value.strip()


def optional_int(tool: str, args: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    """An integer argument clamped to [lo, hi]; integral floats and digit strings are accepted."""
    value = args.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool):
        raise ToolArgumentError(tool, f'"{key}" must be an integer, got a boolean')
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        try:
            value = int(value.strip())
        except ValueError:  # e.g. more digits than Python converts
            raise ToolArgumentError(tool, f'"{key}" is not a usable integer') from None
    if not isinstance(value, int):
        raise ToolArgumentError(tool, f'"{key}" must be an integer, got {type(value).__name__}')
    return min(hi, max(lo, value))


def str_list(tool: str, value: Any, key: str, limit: int) -> list[str]:
    """A string or a list of strings -> non-empty stripped strings, first `limit` kept."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ToolArgumentError(tool, f'"{key}" must be a string or a list of strings')
    items = [x.strip() for x in items if x.strip()]
    if not items:
        raise ToolArgumentError(tool, f'"{key}" must contain at least one non-empty string')
    return items[:limit]


# --------------------------------------------------------------------------- retries


async def with_retries(what: str, fn: Callable[[], Awaitable[T]], policy: RetryConfig,
                       rng: random.Random | None = None,
                       on_retry: Callable[[int, ToolError], None] | None = None) -> T:
    """Call `fn` until it succeeds, raises a non-retryable ToolError, runs out of attempts, or the
    total deadline passes. Backoff: base * 2^k with full jitter, capped; 429s wait at least base*3."""
    rng = rng or random.Random()
    start = time.monotonic()
    last: ToolError | None = None
    for attempt in range(policy.max_attempts):
        try:
            return await fn()
        except ToolError as exc:
            if not exc.retryable:
                raise
            last = exc
        if on_retry is not None:
            on_retry(attempt, last)
        delay = min(policy.max_delay_s, policy.base_delay_s * (2 ** attempt)) * (0.5 + rng.random() / 2)
        if isinstance(last, ToolHTTPError) and last.status == 429:
            delay = max(delay, policy.base_delay_s * 3)
        remaining = policy.deadline_s - (time.monotonic() - start)
        if attempt + 1 >= policy.max_attempts or remaining <= delay:
            break
        await asyncio.sleep(delay)
    assert last is not None
    raise RetriesExhausted(what, last, attempt + 1)


# --------------------------------------------------------------------------- HTTP


def classify_httpx(what: str, exc: Exception) -> ToolError:
    """httpx transport exceptions -> typed, retryable tool errors naming the endpoint."""
    if isinstance(exc, httpx.TimeoutException):
        return ToolTimeout(f"{what}: timed out ({type(exc).__name__})")
    return ToolConnectionError(f"{what}: {type(exc).__name__}: {exc}")


def raise_for_status(what: str, resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        raise ToolHTTPError(what, resp.status_code, resp.reason_phrase)


def json_object(what: str, resp: httpx.Response) -> dict[str, Any]:
    """The response body as a JSON object, or ToolBadResponse (garbage, HTML error pages, arrays)."""
    try:
        data = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ToolBadResponse(f"{what}: response is not JSON (starts {resp.text[:60]!r})") from None
    if not isinstance(data, dict):
        raise ToolBadResponse(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


async def read_capped(resp: httpx.Response, max_bytes: int, what: str) -> bytes:
    """Read a streamed body, refusing (not truncating) anything over `max_bytes` with ToolTooLarge."""
    try:
        return await httputil.read_capped(resp, max_bytes)
    except httputil.BodyTooLarge as exc:
        raise ToolTooLarge(f"{what}: {exc}") from None


# --------------------------------------------------------------------------- URL guard (SSRF)


def _address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for attr, label in (("is_loopback", "loopback"), ("is_link_local", "link-local"), ("is_private", "private"),
                        ("is_multicast", "multicast"), ("is_unspecified", "unspecified"),
                        ("is_reserved", "reserved")):
        if getattr(ip, attr):
            return label
    return None


def check_url_syntax(url: str, allow_private: bool) -> tuple[str, str]:
    """Pure part of the guard: scheme and literal hosts. Returns (scheme, host) or raises ToolRefused."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as exc:
        raise ToolRefused(f"URL {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ToolRefused(f"URL {url!r} refused: only http and https are allowed")
    if not host:
        raise ToolRefused(f"URL {url!r} refused: no host")
    if allow_private:
        return parts.scheme, host
    lowered = host.lower().rstrip(".")
    if lowered == "localhost" or lowered.endswith((".localhost", ".local", ".internal")):
        raise ToolRefused(f"URL {url!r} refused: host {host!r} is local")
    try:
        ip = ipaddress.ip_address(lowered)
    except ValueError:
        return parts.scheme, host
    reason = _address_refusal(ip)
    if reason:
        raise ToolRefused(f"URL {url!r} refused: {host} is a {reason} address")
    return parts.scheme, host


async def guard_url(url: str, allow_private: bool) -> None:
    """Refuse URLs that reach this machine or its private network unless explicitly allowed.

    Host names are resolved and every address is checked; a name that does not resolve here is
    let through (a remote reader such as Jina resolves it itself and reports its own failure)."""
    _, host = check_url_syntax(url, allow_private)
    if allow_private:
        return
    try:
        ipaddress.ip_address(host)
        return  # a literal address was already checked
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        return
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        reason = _address_refusal(ip)
        if reason:
            raise ToolRefused(f"URL {url!r} refused: {host} resolves to a {reason} address ({ip})")


# --------------------------------------------------------------------------- secrets


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret (longest first, so overlapping keys are fully hidden) with ***."""
    for s in sorted({s for s in secrets if s and len(s) >= 4 and s != "EMPTY"}, key=len, reverse=True):
        text = text.replace(s, "***")
    return text


# --------------------------------------------------------------------------- OpenAI-compatible chat


class ChatLengthError(ToolError):
    """The server refused the request because prompt + completion exceed its context length."""

    code, retryable = "context_length", False


_LENGTH_MARKERS = ("context length", "context_length", "maximum context", "prompt is too long",
                   "input is too long")


async def chat_completion(client: httpx.AsyncClient, base_url: str, api_key: str, payload: dict[str, Any],
                          timeout_s: float, what: str) -> dict[str, Any]:
    """One POST to `<base_url>/chat/completions`; returns the first choice as
    {"text", "finish_reason", "usage"} or raises a typed ToolError (4xx naming a length overflow ->
    ChatLengthError)."""
    url = base_url.rstrip("/") + "/chat/completions"
    try:
        resp = await client.post(url, json=payload, timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {api_key}"})
    except httpx.HTTPError as exc:
        raise classify_httpx(what, exc) from None
    if 400 <= resp.status_code < 500 and resp.status_code != 429:
        detail = resp.text[:300]
        if any(m in detail.lower() for m in _LENGTH_MARKERS):
            raise ChatLengthError(f"{what}: HTTP {resp.status_code}: {detail}")
        raise ToolHTTPError(what, resp.status_code, detail)
    raise_for_status(what, resp)
    data = json_object(what, resp)
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ToolBadResponse(f"{what}: no choices[0].message.content in the reply") from None
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ToolBadResponse(f"{what}: choices[0].message.content is {type(text).__name__}, not a string")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return {"text": text, "finish_reason": str(choice.get("finish_reason") or "stop"), "usage": usage}

