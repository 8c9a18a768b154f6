"""Bounded retries with backoff for image-API calls, and the typed errors every image backend raises.

Transient failures (connection errors, timeouts, HTTP 5xx, 408, 429) are retried up to `max_attempts`
within an optional total deadline; a 4xx that waiting cannot heal (bad request, bad key, oversized body)
ends the call at once. Upstream never retried a generation (agent.md §6.3, spec §8 #8).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

RETRYABLE_STATUS = frozenset({408, 409, 429})
ERROR_DETAIL_MAX = 500


class ImageGenError(RuntimeError):
    """Base of every image-generation failure; the message names the backend, the URL and the cause."""


class RequestRejected(ImageGenError):
    """The backend refused the request (a non-retryable 4xx): fix the request, not the server."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ServiceUnavailable(ImageGenError):
    """Every attempt failed transiently (5xx, timeout, connection error) until the retry budget ran out."""

    def __init__(self, message: str, history: tuple[str, ...]) -> None:
        super().__init__(message)
        self.history = history


class GenerationFailed(ImageGenError):
    """The backend answered but produced no usable image (`success: false`, empty or undecodable image)."""


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` calls at most, sleeping min(cap, base * 2^(k-1)) * U(0.5, 1) between them (or the
    server's Retry-After, capped), never past `deadline_s` after the first call when it is set."""

    max_attempts: int = 3
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_base_s < 0 or self.backoff_cap_s < 0:
            raise ValueError("RetryPolicy backoff times must be >= 0")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError(f"RetryPolicy.deadline_s must be positive, got {self.deadline_s}")


@dataclass(frozen=True)
class HttpSettings:
    """Per-request timeouts and the retry policy of one backend. `timeout_s` bounds each read (a
    generation can take minutes: upstream allowed 1800 s)."""

    timeout_s: float = 1800.0
    connect_timeout_s: float = 30.0
    retry: RetryPolicy = RetryPolicy()

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("HttpSettings timeouts must be positive")

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)


def is_retryable_status(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_STATUS


def retry_after_s(response: httpx.Response | None) -> float | None:
    """A numeric Retry-After header in seconds (HTTP-date values are ignored)."""
    if response is None:
        return None
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def backoff_s(attempt: int, policy: RetryPolicy, rng: random.Random, hint_s: float | None = None) -> float:
    """The sleep after failed attempt `attempt` (1-based)."""
    if hint_s is not None:
        return min(policy.backoff_cap_s, hint_s)
    return min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.0)


def error_detail(response: httpx.Response) -> str:
    """The readable part of an error reply: FastAPI `detail`, OpenAI `error.message`, `message`, or text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:ERROR_DETAIL_MAX] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        for value in (body.get("detail"), error.get("message") if isinstance(error, dict) else error, body.get("message")):
            if value:
                return str(value)[:ERROR_DETAIL_MAX]
    return str(body)[:ERROR_DETAIL_MAX]


class AttemptFailed(Exception):
    """One transient failure inside `send_with_retries`: what happened and the reply, if any."""

    def __init__(self, detail: str, response: httpx.Response | None = None) -> None:
        super().__init__(detail)
        self.detail, self.response = detail, response


def check_response(response: httpx.Response, what: str) -> httpx.Response:
    """Return a 2xx reply; raise `AttemptFailed` for a retryable status, `RequestRejected` otherwise."""
    if response.is_success:
        return response
    message = f"{what}: HTTP {response.status_code} from {response.request.url}: {error_detail(response)}"
    if is_retryable_status(response.status_code):
        raise AttemptFailed(message, response)
    raise RequestRejected(message, response.status_code)


def send_with_retries(
    send: Callable[[int], httpx.Response],
    policy: RetryPolicy,
    what: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> httpx.Response:
    """Call `send(attempt)` until it returns a 2xx reply; `what` names the call in errors."""
    rng = rng or random.Random()
    started = clock()
    history: list[str] = []
    stop = "retry budget spent"
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return check_response(send(attempt), what)
        except AttemptFailed as failed:
            history.append(failed.detail)
            hint = retry_after_s(failed.response)
        except httpx.TimeoutException as exc:
            history.append(f"{what}: timed out ({type(exc).__name__}) at {_url(exc)}")
            hint = None
        except httpx.TransportError as exc:
            history.append(f"{what}: {type(exc).__name__} at {_url(exc)}: {exc}")
            hint = None
        if attempt == policy.max_attempts:
            break
        delay = backoff_s(attempt, policy, rng, hint)
        if policy.deadline_s is not None and clock() - started + delay > policy.deadline_s:
            stop = f"deadline of {policy.deadline_s:g} s reached"
            break
        sleep(delay)
    raise ServiceUnavailable(
        f"{what}: gave up after {len(history)} attempt(s) in {clock() - started:.1f} s ({stop}); "
        f"last error: {history[-1]}",
        tuple(history),
    )


def _url(exc: httpx.RequestError) -> str:
    try:
        return str(exc.request.url)
    except RuntimeError:  # an error raised before a request was attached
        return "<no request>"
