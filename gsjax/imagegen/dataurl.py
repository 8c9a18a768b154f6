"""`data:` URLs and base64 image payloads, both directions, as pure functions: the client encodes
reference images this way, the server decodes them, and replies may carry a stray `data:` prefix."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, UnidentifiedImageError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.-]+)*?);base64,(?P<payload>.*)$", re.DOTALL)


class DataUrlError(ValueError):
    """A payload that is not the base64 image it claims to be; the message says what is wrong."""


def image_mime(data: bytes) -> str:
    """`image/<format>` of encoded image bytes, read from the header only (cheap)."""
    if not data:
        raise DataUrlError("empty image data")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError) as exc:
        raise DataUrlError(f"not a recognisable image ({type(exc).__name__}: {exc})") from None
    return f"image/{(fmt or 'jpeg').lower()}"


def to_data_url(data: bytes, mime: str | None = None) -> str:
    """`data:<mime>;base64,<payload>`; the media type is sniffed from the bytes unless given."""
    return f"data:{mime or image_mime(data)};base64," + base64.b64encode(data).decode("ascii")


def decode_base64(payload: str) -> bytes:
    """Strict base64 (whitespace around it allowed); `DataUrlError` on anything else."""
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataUrlError(f"invalid base64 payload ({exc})") from None


def parse_data_url(url: str) -> tuple[str, bytes]:
    """(media type, bytes) of a `data:image/...;base64,` URL; a non-image media type is refused."""
    match = _DATA_URL.match(url)
    if match is None:
        raise DataUrlError("not a base64 data URL (expected data:image/<fmt>;base64,...)")
    mime = match["mime"]
    if mime and not mime.startswith("image/"):
        raise DataUrlError(f"data URL has media type {mime!r}, not image/*")
    return mime, decode_base64(match["payload"])


def decode_image_payload(payload: str) -> bytes:
    """Bytes of a base64 image that may or may not carry a `data:...,` prefix (upstream's client strips
    one when present)."""
    if payload.startswith("data:"):
        return parse_data_url(payload)[1]
    return decode_base64(payload)
