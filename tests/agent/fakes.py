"""Loopback fakes for the agent tests: one real HTTP server speaking Serper, the Jina reader, the
OpenAI chat API and plain image hosting, with per-route fault injection; plus scripted policies.

Each route reads its behaviour from plain attributes so a test states what the world looks like;
faults are queued per route and consumed one per request.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

from gsjax.agent.config import RetryConfig, Secret, ToolsConfig
from gsjax.agent.policy import Message, PolicyReply
from gsjax.agent.protocol import format_answer, format_tool_call

SERPER_KEY = "serper-SECRET-key-0123456789"
JINA_KEYS = ("jina-SECRET-key-aaaa1111", "jina-SECRET-key-bbbb2222")
SUMMARY_KEY = "summary-SECRET-key-zzzz9999"
POLICY_KEY = "policy-SECRET-key-pppp7777"
SUMMARY_MODEL = "fake-summariser"

FAULTS = ("500", "429", "timeout", "slow", "garbage", "error_json")


def make_jpeg(seed: int, size: tuple[int, int] = (96, 80), mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small noisy image (noise keeps files above the 1024-byte minimum)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    img = Image.fromarray(pixels if len(mode) > 1 else pixels[..., 0])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


class _QuietServer(ThreadingHTTPServer):
    """Clients that time out hang up mid-request on purpose; that is not worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


Script = Callable[[list[dict[str, Any]], dict[str, Any]], tuple[str, str]]


@dataclass
class FakeWeb:
    """World state + request log of the loopback server."""

    timeout_sleep_s: float = 1.2
    slow_sleep_s: float = 0.15
    organic: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    image_items: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    pages: dict[str, str] = field(default_factory=dict)
    hosted: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    summary: Callable[[str], str] = lambda prompt: "SUMMARY: " + prompt.split("Query:")[-1].strip()
    policy_script: Script | None = None
    rate_limited_keys: set[str] = field(default_factory=set)
    faults: dict[str, deque[str]] = field(default_factory=lambda: defaultdict(deque))
    log: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ control

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def inject(self, route: str, *faults: str) -> None:
        for f in faults:
            assert f in FAULTS, f
            self.faults[route].append(f)

    def count(self, route: str) -> int:
        with self.lock:
            return sum(1 for r in self.log if r["route"] == route)

    def host_image(self, name: str, data: bytes, ctype: str = "image/jpeg") -> str:
        self.hosted[name] = (data, ctype)
        return f"{self.base}/img/{name}"

    def host_redirect(self, name: str, location: str) -> str:
        return self.host_image(name, b"", f"redirect:{location}")

    def start(self) -> FakeWeb:
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                web._dispatch(self, "GET")

            def do_POST(self) -> None:
                web._dispatch(self, "POST")

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # ------------------------------------------------------------------ serving

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("content-length") or 0)
        raw = h.rfile.read(length) if length else b""
        path = h.path
        route = ("search" if path.startswith("/serper/search") else "images" if path.startswith("/serper/images")
                 else "jina" if path.startswith("/jina/") else "img" if path.startswith("/img/")
                 else "chat" if path.endswith("/chat/completions") else "other")
        body = json.loads(raw) if raw and route in ("search", "images", "chat") else None
        if route == "chat" and body and body.get("model") == SUMMARY_MODEL:
            route = "summary"
        with self.lock:
            self.log.append({"route": route, "path": path, "headers": dict(h.headers), "body": body})
            fault = self.faults[route].popleft() if self.faults[route] else None
        if fault == "timeout":
            time.sleep(self.timeout_sleep_s)
        elif fault == "slow":
            time.sleep(self.slow_sleep_s)
        if fault in ("500", "429"):
            return self._send(h, int(fault), b'{"message": "injected"}', "application/json")
        if fault == "garbage":
            return self._send(h, 200, b"<html>not json{{", "application/json")
        try:
            status, payload, ctype = getattr(self, f"_route_{route}")(h, path, body, fault)
        except Exception as exc:  # a bug in the fake: make it visible as a 599
            return self._send(h, 599, f"fake server error: {exc!r}".encode(), "text/plain")
        if ctype.startswith("redirect:"):
            return self._send(h, 302, b"", "text/plain", {"Location": ctype.removeprefix("redirect:")})
        self._send(h, status, payload, ctype)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        try:
            h.send_response(status)
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _json(self, obj: Any, status: int = 200) -> tuple[int, bytes, str]:
        return status, json.dumps(obj).encode(), "application/json"

    def _serper_auth(self, h: BaseHTTPRequestHandler) -> tuple[int, bytes, str] | None:
        key = h.headers.get("X-API-KEY", "")
        if key != SERPER_KEY:  # like a careless API, echo the key back in the error
            return self._json({"message": f"Unauthorized: key {key!r} is invalid"}, 403)
        return None

    def _route_search(self, h, path, body, fault):  # type: ignore[no-untyped-def]
        if (denied := self._serper_auth(h)) is not None:
            return denied
        if fault == "error_json":  # a careless API echoing the caller's key in an error
            return self._json({"message": f"Query failed for key {h.headers.get('X-API-KEY')}"})
        hits = self.organic.get(body["q"], [{"title": f"<b>{body['q']}</b> page {i}", "link": f"https://example.com/{i}",
                                             "snippet": f"About <b>{body['q']}</b> #{i}"} for i in range(3)])
        return self._json({"searchParameters": body, "organic": hits[: body.get("num", 10)]})

    def _route_images(self, h, path, body, fault):  # type: ignore[no-untyped-def]
        if (denied := self._serper_auth(h)) is not None:
            return denied
        if fault == "error_json":
            return self._json({"error": "image search failed upstream"})
        items = self.image_items.get(body["q"], [])
        return self._json({"searchParameters": body, "images": items[: body.get("num", 10)]})

    def _route_jina(self, h, path, body, fault):  # type: ignore[no-untyped-def]
        key = h.headers.get("Authorization", "").removeprefix("Bearer ")
        if key in self.rate_limited_keys:
            return 429, b"rate limited", "text/plain"
        if key not in JINA_KEYS:
            return 401, b"bad key", "text/plain"
        url = path[len("/jina/"):]
        if url not in self.pages:
            return 404, b"no such page", "text/plain"
        return 200, self.pages[url].encode(), "text/plain; charset=utf-8"

    def _route_img(self, h, path, body, fault):  # type: ignore[no-untyped-def]
        name = path[len("/img/"):]
        if name not in self.hosted:
            return 404, b"missing", "text/plain"
        data, ctype = self.hosted[name]
        return 200, data, ctype

    def _route_summary(self, h, path, body, fault):  # type: ignore[no-untyped-def]
        if h.headers.get("Authorization") != f"Bearer {SUMMARY_KEY}":
            return self._json({"error": {"message": "bad summary key"}}, 401)
        return self._json(chat_reply(self.summary(body["messages"][0]["content"]), "stop"))

    def _route_chat(self, h, path, body, fault):  # type: ignore[no-untyped-def]
        if (auth := h.headers.get("Authorization")) != f"Bearer {POLICY_KEY}":
            return self._json({"error": {"message": f"invalid credentials {auth}"}}, 401)
        assert self.policy_script is not None, "no policy script installed"
        text, finish = self.policy_script(body["messages"], body)
        if text == "__CONTEXT_OVERFLOW__":
            return self._json({"object": "error", "message": "This model's maximum context length is 32768 tokens"}, 400)
        return self._json(chat_reply(text, finish))

    def _route_other(self, h, path, body, fault):  # type: ignore[no-untyped-def]
        return 404, b"unknown route", "text/plain"


def chat_reply(text: str, finish: str) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


# ---------------------------------------------------------------------- scripted policies


def _text_of(m: dict[str, Any] | Message) -> str:
    if isinstance(m, Message):
        return m.text
    c = m["content"]
    return c if isinstance(c, str) else "\n".join(p.get("text", "") for p in c if p.get("type") == "text")


def _role(m: dict[str, Any] | Message) -> str:
    return m.role if isinstance(m, Message) else m["role"]


def issued_ids(messages: Sequence[dict[str, Any] | Message]) -> list[str]:
    ids: list[str] = []
    for m in messages:
        if _role(m) == "user":
            for i in re.findall(r"IMG_\d{3,}", _text_of(m)):
                if i not in ids:
                    ids.append(i)
    return ids


Step = str | Callable[[Sequence[Any]], str]


def step_text(steps: Sequence[Step], messages: Sequence[Any]) -> str:
    """The turn for this point of the episode: indexed by assistant turns so far (stateless)."""
    n = sum(1 for m in messages if _role(m) == "assistant")
    step = steps[min(n, len(steps) - 1)]
    return step(messages) if callable(step) else step


def answer_with_first_image(messages: Sequence[Any]) -> str:
    ids = issued_ids(messages)
    refs = [{"img_id": ids[0], "note": "copy the main subject"}] if ids else []
    return format_answer("A photo of the subject as in the first reference image.", refs, think="enough")


def research_steps(url: str = "https://kb.gsjax.example/eiffel-tower") -> list[Step]:
    """search -> image_search -> browse -> answer."""
    return [format_tool_call("search", {"queries": ["eiffel tower paint colour"], "top_k": 3}, think="facts"),
            format_tool_call("image_search", {"query": "eiffel tower"}, think="look"),
            format_tool_call("browse", {"url": url, "query": "paint colour"}, think="read"),
            answer_with_first_image]


class ScriptedPolicy:
    """In-process Policy following a step list (same indexing as the HTTP fake)."""

    def __init__(self, steps: Sequence[Step], finish: Callable[[str], str] = lambda t: "stop"):
        self.steps, self.finish = list(steps), finish
        self.calls = 0

    async def complete(self, messages: Sequence[Message], max_tokens: int) -> PolicyReply:
        self.calls += 1
        text = step_text(self.steps, messages)
        return PolicyReply(text=text, finish_reason=self.finish(text), prompt_tokens=3, completion_tokens=2)


def http_script(steps: Sequence[Step], finish: str = "stop") -> Script:
    return lambda messages, payload: (step_text(steps, messages), finish)


# ---------------------------------------------------------------------- configs

FAST_RETRY = RetryConfig(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05, request_timeout_s=0.6, deadline_s=5.0)


def serper_config(web: FakeWeb, **overrides: object) -> ToolsConfig:
    base = dict(
        backend="serper", serper_key=Secret(SERPER_KEY), text_search_url=f"{web.base}/serper/search",
        image_search_url=f"{web.base}/serper/images", jina_keys=Secret(",".join(JINA_KEYS)),
        jina_base_url=f"{web.base}/jina", summary_base_url=f"{web.base}/v1", summary_model=SUMMARY_MODEL,
        summary_api_key=Secret(SUMMARY_KEY), allow_private_urls=True, retry=FAST_RETRY,
        download_retry=FAST_RETRY, summary_retry=FAST_RETRY, reader_retry=FAST_RETRY, tool_deadline_s=10.0,
        browse_deadline_s=10.0)
    base.update(overrides)
    return ToolsConfig(**base)  # type: ignore[arg-type]
