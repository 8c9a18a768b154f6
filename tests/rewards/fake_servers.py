"""Loopback HTTP fakes: an OpenAI-compatible chat server (judge) and an image server, both real
HTTP on 127.0.0.1 with an ephemeral port, counting and recording every request."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: object = None  # dict -> JSON, str -> raw text
    delay_s: float = 0.0


def chat(content: str | None, refusal: str | None = None) -> Reply:
    """A chat-completions reply whose assistant message is `content`."""
    message = {"role": "assistant", "content": content}
    if refusal is not None:
        message["refusal"] = refusal
    return Reply(200, {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message}]})


def chat_json(obj: dict) -> Reply:
    return chat(json.dumps(obj))


Responder = Callable[[str, dict], Reply]


def scripted(replies: Sequence[Reply]) -> Responder:
    """Replies in order; the last one repeats forever."""
    state = {"i": 0}
    lock = threading.Lock()

    def respond(path: str, body: dict) -> Reply:
        with lock:
            reply = replies[min(state["i"], len(replies) - 1)]
            state["i"] += 1
        return reply

    return respond


class LoopbackServer:
    """`responder(path, json_body) -> Reply` behind a threaded HTTP server."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append((self.path, body))
                reply = server.responder(self.path, body)
                time.sleep(reply.delay_s)
                payload = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload.encode())))
                    self.end_headers()
                    self.wfile.write(payload.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def image_server_reply(body: dict) -> Reply:
    """The agent.md §6.1 success reply: a base64 PNG whose colour encodes the number of inputs."""
    n = len(body.get("image_urls") or [])
    return Reply(200, {"success": True, "image": base64.b64encode(png_bytes((10 * n, 100, 200))).decode()})


def user_text(body: dict) -> str:
    """The text part of the user message of a chat request."""
    return body["messages"][1]["content"][0]["text"]


def image_parts(body: dict) -> list[dict]:
    return list(body["messages"][1]["content"][1:])
