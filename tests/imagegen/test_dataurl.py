"""data: URLs and base64 payloads, both directions."""

from __future__ import annotations

import base64

import pytest

from gsjax.imagegen.dataurl import (
    DataUrlError,
    decode_image_payload,
    image_mime,
    parse_data_url,
    to_data_url,
)
from tests.imagegen.fakes import encoded_image


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_round_trip_keeps_bytes_and_names_the_real_format(fmt, mime):
    data = encoded_image((10, 20, 30), fmt=fmt)
    url = to_data_url(data)
    assert url.startswith(f"data:{mime};base64,")
    assert parse_data_url(url) == (mime, data)
    assert image_mime(data) == mime


def test_payloads_with_or_without_prefix_decode_alike():
    data = encoded_image((1, 2, 3))
    plain = base64.b64encode(data).decode()
    assert decode_image_payload(plain) == decode_image_payload("data:image/png;base64," + plain) == data
    assert decode_image_payload(f"\n{plain}\n") == data


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: image_mime(b""), "empty image data"),
        (lambda: image_mime(b"GIF-ish nonsense"), "not a recognisable image"),
        (lambda: parse_data_url("data:image/png;base64,***"), "invalid base64 payload"),
        (lambda: parse_data_url("data:application/pdf;base64,AAAA"), "media type 'application/pdf'"),
        (lambda: parse_data_url("https://example.org/a.png"), "not a base64 data URL"),
        (lambda: decode_image_payload("not base64!"), "invalid base64 payload"),
    ],
)
def test_bad_payloads_say_what_is_wrong(call, message):
    with pytest.raises(DataUrlError, match=message):
        call()
