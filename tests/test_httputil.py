"""The shared httpx helpers: capped streamed reads, JSON reply checks, client ownership."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gsjax.httputil import BadJSONReply, BodyTooLarge, OwnsHttpClient, json_object, read_capped, reply_json


def _read(body: bytes, max_bytes: int, headers: dict[str, str] | None = None) -> bytes:
    async def stream_body():
        for i in range(0, len(body), 4):
            yield body[i : i + 4]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers, content=stream_body())

    async def go() -> bytes:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            async with client.stream("GET", "http://x/") as resp:
                return await read_capped(resp, max_bytes)

    return asyncio.run(go())


def test_read_capped_returns_a_body_within_the_cap():
    assert _read(b"0123456789", 10) == b"0123456789"


def test_read_capped_refuses_a_body_over_the_cap_while_streaming():
    with pytest.raises(BodyTooLarge, match="body exceeds the cap of 9 bytes") as info:
        _read(b"0123456789", 9)
    assert info.value.declared is None and info.value.max_bytes == 9


def test_read_capped_refuses_a_declared_length_over_the_cap_before_reading():
    with pytest.raises(BodyTooLarge, match="body of 100 bytes exceeds the cap of 9") as info:
        _read(b"0123", 9, headers={"content-length": "100"})
    assert info.value.declared == 100


def test_json_helpers_accept_objects_and_name_what_is_wrong():
    assert json_object(httpx.Response(200, json={"a": 1})) == {"a": 1}
    assert reply_json(httpx.Response(200, json=[1, 2])) == [1, 2]
    with pytest.raises(BadJSONReply, match="reply is not JSON: '<html>"):
        reply_json(httpx.Response(200, text="<html>oops</html>"))
    with pytest.raises(BadJSONReply, match=r"reply is not a JSON object: '\[1, 2\]'"):
        json_object(httpx.Response(200, text="[1, 2]"))


def test_owns_http_client_closes_on_exit():
    class Holder(OwnsHttpClient):
        def __init__(self) -> None:
            self._http = httpx.Client()

    with Holder() as holder:
        assert not holder._http.is_closed
    assert holder._http.is_closed
