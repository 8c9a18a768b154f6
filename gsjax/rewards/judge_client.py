"""One OpenAI-compatible vision chat call, made robust: bounded retries with backoff, JSON
extraction, validation by the caller's parser, typed failures and a content-hash cache.

Every judge in gsjax (image, text, WISE) goes through `JudgeClient.judge`, so retry, failure
and caching semantics are defined once (spec training_and_eval.md §2.3, §2.6).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

import httpx
from PIL import Image, ImageOps

from gsjax.fileio import atomic_write_text

T = TypeVar("T")
ImageSource = Path | bytes
"""A judge image: a file (read lazily) or in-memory bytes (RL judges the bytes it generated)."""

MAX_IMAGE_SIDE = 4096
_REFUSAL = re.compile(r"\b(I'?m sorry|I am sorry|I can(?:no|')t|I am unable|I'm unable|cannot assist|can't help)\b", re.I)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_FENCE = re.compile(r"```(?:json|JSON)?")
# Statuses worth retrying: rate limits, server errors, request timeouts/conflicts. Other 4xx
# (bad key, bad request, unknown model) will not heal by waiting, so they end the call at once.
_RETRYABLE_4XX = {408, 409, 429}


class InvalidJudgeOutput(ValueError):
    """A reply that parsed but broke the rubric (missing/non-numeric/out-of-range value)."""


class ImageUnreadable(ValueError):
    """An input image that cannot be decoded; the judge sees a warning text instead."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to call the judge. Defaults are the spec's (§2.3); tests shrink them."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4.1"
    api_key: str = ""
    temperature: float = 0.0
    max_tokens: int = 8192
    timeout_s: float = 300.0
    max_attempts: int = 30
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 10.0
    deadline_s: float | None = None
    cache_dir: Path | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> JudgeConfig:
        """Read upstream's `GEN_REWARD_*` variables; explicit overrides win."""
        env = dict(os.environ if env is None else env)
        base = cls(
            base_url=env.get("GEN_REWARD_API_BASE_URL", cls.base_url),
            model=env.get("GEN_REWARD_MODEL", cls.model),
            api_key=env.get("GEN_REWARD_API_KEY", ""),
            max_attempts=int(env.get("GEN_REWARD_MAX_TRY", cls.max_attempts)),
        )
        return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class JudgeFailure:
    """Why a judgement is missing: the last failure kind, its detail, and every attempt's kind."""

    reason: str
    detail: str
    attempts: int
    history: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{self.reason} after {self.attempts} attempt(s): {self.detail}"


@dataclass(frozen=True)
class JudgeResult(Generic[T]):
    """A judgement or a failure, never both; `backend` says what produced it (model or heuristic)."""

    value: T | None
    failure: JudgeFailure | None
    model: str
    rubric_version: str
    backend: str = "openai-compatible"
    attempts: int = 0
    cached: bool = False
    raw: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def provenance(self) -> dict[str, object]:
        """The fields every stored record carries about its judge."""
        return {
            "backend": self.backend,
            "model": self.model,
            "rubric_version": self.rubric_version,
            "attempts": self.attempts,
            "cached": self.cached,
        }


@dataclass(frozen=True)
class JudgeRequest:
    """What the judge sees: a system prompt, a user text and images appended in order."""

    system: str
    user_text: str
    images: Sequence[ImageSource]
    rubric_version: str


class _Attempt(Exception):
    """One failed call; `kind` names the failure class recorded if it is the last one."""

    def __init__(self, kind: str, detail: str, retryable: bool = True) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.retryable = kind, detail, retryable


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Sleep before retry `attempt` (1-based): min(cap, base * 2^(k-1)) * U(0.8, 1.2)."""
    return min(cap_s, base_s * 2 ** (attempt - 1)) * rng.uniform(0.8, 1.2)


def read_image_bytes(source: ImageSource) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def encode_image_jpeg(data: bytes) -> str:
    """EXIF-transpose, LANCZOS-downscale to <= 4096 px, composite alpha on white, JPEG q100."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            img = ImageOps.exif_transpose(opened)
            img.load()
    except Exception as exc:  # PIL raises many types for broken files
        raise ImageUnreadable(f"cannot decode image ({len(data)} bytes): {exc}") from exc
    if max(img.size) > MAX_IMAGE_SIDE:
        scale = MAX_IMAGE_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=100, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def extract_json_object(text: str) -> dict:
    """Strip code fences, take first `{` .. last `}`, parse; retry without trailing commas."""
    stripped = _FENCE.sub("", text)
    start, end = stripped.find("{"), stripped.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object in the reply")
    body = stripped[start : end + 1]
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        obj = json.loads(_TRAILING_COMMA.sub(r"\1", body))
    if not isinstance(obj, dict):
        raise ValueError(f"reply JSON is a {type(obj).__name__}, not an object")
    return obj


@dataclass
class JudgeCache:
    """Judge replies stored by content hash, one file per key (safe across threads and processes)."""

    root: Path

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["raw"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, raw: str) -> None:
        atomic_write_text(self._path(key), json.dumps({"raw": raw}))


@dataclass
class JudgeClient:
    """Calls `/chat/completions` of an OpenAI-compatible server and validates the reply."""

    config: JudgeConfig
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    _http: httpx.Client | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def cache(self) -> JudgeCache | None:
        return JudgeCache(Path(self.config.cache_dir)) if self.config.cache_dir else None

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                self._http = httpx.Client(timeout=httpx.Timeout(self.config.timeout_s))
            return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()

    def cache_key(self, request: JudgeRequest, image_bytes: Sequence[bytes | None]) -> str:
        """Hash of judge model + rubric version + prompts + image content (not file names)."""
        doc = {
            "model": self.config.model,
            "rubric_version": request.rubric_version,
            "system": request.system,
            "user": request.user_text,
            "images": [hashlib.sha256(b).hexdigest() if b is not None else None for b in image_bytes],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def judge(self, request: JudgeRequest, parse: Callable[[dict], T]) -> JudgeResult[T]:
        """Cache lookup, then up to `max_attempts` calls; a reply `parse` rejects is a failed attempt."""
        cfg = self.config
        images = [_safe_read(src) for src in request.images]
        key = self.cache_key(request, images)
        cache = self.cache
        if cache is not None and (raw := cache.get(key)) is not None:
            try:
                return self._result(parse(extract_json_object(raw)), None, 0, cached=True, raw=raw, request=request)
            except (ValueError, TypeError):
                pass  # a stale entry the current parser rejects: judge again
        payload = self._payload(request, images)
        started = time.monotonic()
        history: list[str] = []
        last = _Attempt("not_attempted", "max_attempts is 0")
        for attempt in range(1, cfg.max_attempts + 1):
            try:
                raw = self._post(payload)
                value = _parse_reply(raw, parse)
            except _Attempt as failed:
                last = failed
                history.append(failed.kind)
                if not failed.retryable or attempt == cfg.max_attempts:
                    break
                delay = backoff_delay(attempt, cfg.backoff_base_s, cfg.backoff_cap_s, self.rng)
                if cfg.deadline_s is not None and time.monotonic() - started + delay > cfg.deadline_s:
                    last = _Attempt(failed.kind, f"{failed.detail} (deadline {cfg.deadline_s}s reached)")
                    break
                self.sleep(delay)
                continue
            if cache is not None:
                cache.put(key, raw)
            return self._result(value, None, attempt, cached=False, raw=raw, request=request)
        failure = JudgeFailure(last.kind, last.detail, len(history), tuple(history))
        return self._result(None, failure, len(history), cached=False, raw=None, request=request)

    def _result(
        self, value: T | None, failure: JudgeFailure | None, attempts: int, *, cached: bool, raw: str | None,
        request: JudgeRequest,
    ) -> JudgeResult[T]:
        return JudgeResult(
            value=value,
            failure=failure,
            model=self.config.model,
            rubric_version=request.rubric_version,
            attempts=attempts,
            cached=cached,
            raw=raw,
        )

    def _payload(self, request: JudgeRequest, images: Sequence[bytes | None]) -> dict:
        content: list[dict] = [{"type": "text", "text": request.user_text}]
        for index, data in enumerate(images, start=1):
            content.append(_image_part(index, data))
        return {
            "model": self.config.model,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
            "messages": [
                {"role": "system", "content": request.system},
                {"role": "user", "content": content},
            ],
        }

    def _post(self, payload: dict) -> str:
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        try:
            response = self._client().post(url, json=payload, headers=headers)
        except httpx.TimeoutException as exc:
            raise _Attempt("timeout", f"no reply within {self.config.timeout_s}s ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise _Attempt("transport", f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            code = response.status_code
            kind = "rate_limited" if code == 429 else f"http_{code}"
            retryable = code >= 500 or code in _RETRYABLE_4XX
            raise _Attempt(kind, f"HTTP {code}: {response.text[:300]}", retryable)
        try:
            message = response.json()["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Attempt("malformed_response", f"not a chat completion: {response.text[:300]}") from exc
        if message.get("refusal"):
            raise _Attempt("refusal", str(message["refusal"])[:300])
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise _Attempt("empty_reply", "the judge returned no text")
        return content


def _safe_read(source: ImageSource) -> bytes | None:
    """Image bytes, or None when the file is gone; the judge then gets a warning part."""
    try:
        return read_image_bytes(source)
    except OSError:
        return None


def _image_part(index: int, data: bytes | None) -> dict:
    if data is not None:
        try:
            return {"type": "image_url", "image_url": {"url": encode_image_jpeg(data)}}
        except ImageUnreadable as exc:
            return {"type": "text", "text": f"[Warning: Image {index} could not be read: {exc}]"}
    return {"type": "text", "text": f"[Warning: Image {index} is missing]"}


def _parse_reply(raw: str, parse: Callable[[dict], T]) -> T:
    """Turn a reply into the caller's value, classifying what went wrong for the failure record."""
    try:
        obj = extract_json_object(raw)
    except ValueError as exc:
        kind = "refusal" if "{" not in raw and _REFUSAL.search(raw) else "invalid_json"
        raise _Attempt(kind, f"{exc}; reply starts {raw[:200]!r}") from exc
    try:
        return parse(obj)
    except (InvalidJudgeOutput, ValueError, TypeError) as exc:
        raise _Attempt("invalid_values", str(exc)) from exc
