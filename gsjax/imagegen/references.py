"""Reference images of a `/generate` request -> RGB PIL images, before any device is taken, so a bad
image is a 400 that names it and never holds a GPU."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from gsjax.httputil import BodyTooLarge, read_capped
from gsjax.imagegen.dataurl import DataUrlError, parse_data_url


class BadImage(ValueError):
    """A reference image that cannot be used; the message names it."""


@dataclass(frozen=True)
class ImageLimits:
    """What the server accepts as a reference image."""

    max_pixels: int = 40_000_000
    allow_urls: bool = True
    url_max_bytes: int = 32 * 2**20


def open_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes to RGB (upstream converts every input), refusing empty data and images over
    `max_pixels` before their pixels are decoded."""
    if not data:
        raise BadImage("empty image data")
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise BadImage(f"not a decodable image ({type(exc).__name__}: {exc})") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise BadImage(f"{width}x{height} image exceeds {max_pixels} pixels")
        try:
            return img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"not a decodable image ({type(exc).__name__}: {exc})") from None


async def fetch_image_bytes(client: httpx.AsyncClient, url: str, max_bytes: int) -> bytes:
    """GET `url`, streaming, refusing non-2xx answers and bodies over `max_bytes`."""
    try:
        async with client.stream("GET", url) as response:
            if not response.is_success:
                raise BadImage(f"fetching {url} returned HTTP {response.status_code}")
            return await read_capped(response, max_bytes)
    except BodyTooLarge:
        raise BadImage(f"{url} is larger than {max_bytes} bytes") from None
    except httpx.HTTPError as exc:
        raise BadImage(f"fetching {url} failed ({type(exc).__name__}: {exc})") from None


async def image_bytes(url: str, limits: ImageLimits, client: httpx.AsyncClient) -> bytes:
    """The encoded bytes behind one `image_urls` entry."""
    if url.startswith("data:"):
        try:
            return parse_data_url(url)[1]
        except DataUrlError as exc:
            raise BadImage(str(exc)) from None
    if url.startswith(("http://", "https://")) and limits.allow_urls:
        return await fetch_image_bytes(client, url, limits.url_max_bytes)
    allowed = "a data: URL or an http(s) URL" if limits.allow_urls else "a data: URL (URL fetching is off)"
    raise BadImage(f"must be {allowed}, got {url[:40]!r}")


async def load_reference_images(urls: list[str], limits: ImageLimits, client: httpx.AsyncClient) -> list[Image.Image]:
    """Every `image_urls` entry as an RGB image; a `BadImage` names the offending index."""
    images = []
    for index, url in enumerate(urls):
        try:
            data = await image_bytes(url, limits, client)
            images.append(await asyncio.to_thread(open_rgb, data, limits.max_pixels))
        except BadImage as exc:
            raise BadImage(f"image_urls[{index}]: {exc}") from None
    return images
