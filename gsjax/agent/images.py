"""Images the agent handles: verify and re-encode downloads, resize for the policy, store by content.

One resize function for every path (spec §4.4, gsjax §8 item 10). Files are content-addressed
(`<sha256>.jpg`), so concurrent writers of the same image write the same bytes and different images
can never overwrite each other; every write is tmp + `os.replace`.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from gsjax.fileio import atomic_write_bytes
from gsjax.processing.images import smart_resize


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can fully decode, or decoding would exceed the pixel cap."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_verified(data: bytes, max_pixels: int) -> Image.Image:
    """Decode `data` fully (not just the header); refuse decompression bombs and truncated files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
                fmt = probe.format
                if w * h > max_pixels:
                    raise ImageDecodeError(f"{fmt} image of {w}x{h} pixels exceeds the cap of {max_pixels}")
                probe.verify()
            img = Image.open(io.BytesIO(data))
            img.load()
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"not a decodable image ({type(exc).__name__}: {exc})") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (spec §5.3 step 2)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def reencode_download(data: bytes, quality: int, max_decoded_pixels: int) -> bytes:
    """Downloaded bytes -> verified RGB JPEG (quality 85 upstream); raises ImageDecodeError."""
    return encode_jpeg(decode_verified(data, max_decoded_pixels), quality)


def policy_view(data: bytes, factor: int, min_pixels: int, max_pixels: int,
                quality: int = 95) -> tuple[bytes, int, int]:
    """The exact pixels the policy sees: smart-resized RGB JPEG, plus its (width, height)."""
    img = to_rgb(decode_verified(data, max(max_pixels * 64, 50_000_000)))
    h, w = smart_resize(img.height, img.width, factor, min_pixels, max_pixels)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    return encode_jpeg(img, quality), w, h


EPISODE_IMAGE_NAME_CHARS = 16
"""Hex digits in an episode store's file names (see ImageStore)."""


class ImageStore:
    """A folder of content-addressed JPEGs. Safe for many concurrent writers.

    Files are named by the first `name_chars` hex digits of their sha256 (all 64 by default). An episode's
    store uses 16: its file names are shown to the policy, where 48 more hex digits would cost about 40
    tokens per listed image and buy nothing (a 64-bit name clash within one episode's handful of images is
    not a practical risk, and `get` would refuse the wrong bytes rather than return them)."""

    def __init__(self, root: Path | str, name_chars: int = 64):
        if not 8 <= name_chars <= 64:
            raise ValueError(f"name_chars must be in [8, 64], got {name_chars}")
        self.root = Path(root)
        self.name_chars = name_chars

    def path(self, digest: str) -> Path:
        return self.root / f"{digest[:self.name_chars]}.jpg"

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, data: bytes) -> str:
        """Store bytes, return their sha256. An existing file with that name already holds them."""
        digest = sha256_hex(data)
        target = self.path(digest)
        if not target.is_file():
            atomic_write_bytes(target, data)
        return digest

    def get(self, digest: str) -> bytes:
        data = self.path(digest).read_bytes()
        if sha256_hex(data) != digest:
            raise ImageDecodeError(f"stored image {self.path(digest)} does not match its content hash")
        return data

    def copy_from(self, other: ImageStore, digest: str) -> None:
        if not self.has(digest):
            self.put(other.get(digest))


@dataclass(frozen=True)
class RegisteredImage:
    """One entry of the per-episode IMG registry (spec §4.2)."""

    img_id: str
    sha256: str
    title: str
    url: str
    page_url: str
    local_path: str

    def to_record(self) -> dict[str, str]:
        return {"img_id": self.img_id, "sha256": self.sha256, "title": self.title, "url": self.url,
                "page_url": self.page_url, "local_path": self.local_path}


class ImageRegistry:
    """IMG_### ids for one episode: a file seen before keeps its id; new files count up from 1."""

    def __init__(self) -> None:
        self._by_key: dict[str, RegisteredImage] = {}
        self._by_id: dict[str, RegisteredImage] = {}

    def register(self, *, sha256: str, local_path: str, title: str, url: str, page_url: str) -> RegisteredImage:
        key = sha256 or url
        if key in self._by_key:
            return self._by_key[key]
        entry = RegisteredImage(img_id=f"IMG_{len(self._by_id) + 1:03d}", sha256=sha256, title=title,
                                url=url, page_url=page_url, local_path=local_path)
        self._by_key[key] = entry
        self._by_id[entry.img_id] = entry
        return entry

    def __contains__(self, img_id: object) -> bool:
        return img_id in self._by_id

    def get(self, img_id: str) -> RegisteredImage:
        return self._by_id[img_id]

    def entries(self) -> list[RegisteredImage]:
        return list(self._by_id.values())
