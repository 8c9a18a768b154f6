"""Small httpx helpers shared by gsjax's HTTP clients (agent tools, image generation, SGLang): a streamed
read with a byte cap, reply-body JSON checks, and close / `with` support for an object that holds a client.

The helpers raise their own `ValueError`s with a message that does not name the endpoint; each caller
turns them into its own typed error, prefixed with what it was calling.
"""

from __future__ import annotations

from typing import Any, Self

import httpx


class BodyTooLarge(ValueError):
    """A response body over the byte cap; `declared` is the Content-Length when the header alone told."""

    def __init__(self, max_bytes: int, declared: int | None = None) -> None:
        self.max_bytes, self.declared = max_bytes, declared
        if declared is None:
            super().__init__(f"body exceeds the cap of {max_bytes} bytes")
        else:
            super().__init__(f"body of {declared} bytes exceeds the cap of {max_bytes}")


class BadJSONReply(ValueError):
    """A reply body that is not JSON, or not the JSON object the caller expects."""


async def read_capped(resp: httpx.Response, max_bytes: int) -> bytes:
    """Read a streamed body, refusing (not truncating) anything over `max_bytes`: at once when the
    Content-Length says so, else as soon as the received chunks pass the cap. Raises `BodyTooLarge`."""
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(max_bytes, int(declared))
    chunks, size = [], 0
    async for chunk in resp.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def reply_json(resp: httpx.Response) -> Any:
    """The decoded JSON body (any JSON value); `BadJSONReply` quoting its start when it is not JSON."""
    try:
        return resp.json()
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadJSONReply(f"reply is not JSON: {resp.text[:200]!r}") from None


def json_object(resp: httpx.Response) -> dict[str, Any]:
    """The body as a JSON object; `BadJSONReply` when it is not JSON or is another JSON value."""
    data = reply_json(resp)
    if not isinstance(data, dict):
        raise BadJSONReply(f"reply is not a JSON object: {resp.text[:200]!r}")
    return data


class OwnsHttpClient:
    """Mixin for an object that holds its `httpx.Client` as `self._http`: `close()` closes it, and the
    object is a context manager that closes it on exit."""

    _http: httpx.Client

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
