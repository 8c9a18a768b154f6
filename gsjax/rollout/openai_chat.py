"""OpenAI chat / SGLang `/generate` requests -> engine requests, and engine results -> their replies.

Pure functions over the tokenizer and image processor, so the HTTP server stays a thin shell. Images only
arrive inline (data URLs or bare base64): a policy server that fetched URLs or read paths named by a client
would be an SSRF / file-read hole. They are decoded like `load_image_file` (EXIF transpose, RGB), the one
decode every gsjax path shares, so a prompt sent over HTTP gets the same pixels as the in-process agent.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gsjax.processing.chat import ChatEncodingError, encode_chat, image_payload, is_image_item
from gsjax.processing.images import ImageProcessorConfig, process_images
from gsjax.processing.tokens import IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID
from gsjax.rollout.engine import ImageInputs

DEFAULT_MAX_DECODED_PIXELS = 50_000_000


class RequestError(ValueError):
    """The client's request cannot be served as sent (HTTP 400)."""


class ContextLengthError(RequestError):
    """Prompt plus requested tokens exceed the context; the message names the limit the way OpenAI-style
    servers do, so clients (the agent's `chat_completion`) recognise it as a length overflow."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int):
        super().__init__(
            f"This model's maximum context length is {limit} tokens, but the request has {prompt_tokens} prompt "
            f"tokens and asks for {max_tokens} more ({prompt_tokens + max_tokens} in all)."
        )


# --------------------------------------------------------------------------- images


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:<mime>;base64,<payload>` URL or of a bare base64 string."""
    if not isinstance(url, str) or not url:
        raise RequestError("an image must be a non-empty data URL or base64 string")
    if url.startswith(("http://", "https://", "file:", "/")):
        raise RequestError("images must be sent inline as data URLs; this server does not fetch URLs or read paths")
    payload = url
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(f"unsupported data URL header {header[:40]!r}: expected data:<mime>;base64,...")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise RequestError(f"an inline image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"an inline image is not valid base64: {exc}") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_DECODED_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 with `load_image_file` semantics; bombs and junk are 400s."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > max_pixels:
                    raise RequestError(f"an image of {img.width}x{img.height} pixels exceeds {max_pixels}")
                return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        if isinstance(exc, RequestError):
            raise
        raise RequestError(f"an inline image cannot be decoded: {exc}") from None


def image_inputs(encoded: Sequence[bytes], cfg: ImageProcessorConfig,
                 max_pixels: int = DEFAULT_MAX_DECODED_PIXELS) -> ImageInputs | None:
    """Encoded images -> the engine's preprocessed `ImageInputs` (None without images)."""
    if not encoded:
        return None
    pixels, grid = process_images([decode_image(b, max_pixels) for b in encoded], cfg)
    return ImageInputs(pixel_values=pixels, image_grid_thw=grid, encoded=tuple(encoded))


def image_token_counts(grid: np.ndarray, cfg: ImageProcessorConfig) -> list[int]:
    """`<|image_pad|>` tokens per image: one per merged patch."""
    return [int(np.prod(row)) // cfg.merge_size**2 for row in np.asarray(grid)]


def pad_runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of `<|image_pad|>` ids."""
    runs, start = [], None
    for i, tok in enumerate(ids):
        if tok == IMAGE_PAD_ID and start is None:
            start = i
        elif tok != IMAGE_PAD_ID and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(ids)))
    return runs


def expand_image_pads(ids: Sequence[int], counts: Sequence[int]) -> list[int]:
    """Make each image's pad run exactly as long as its grid needs. A run of one pad (a client that did not
    expand) grows to the count; a run of the right length is kept; anything else is a 400. Each run must sit
    between `<|vision_start|>` and `<|vision_end|>` as the chat template writes it."""
    runs = pad_runs(ids)
    if len(runs) != len(counts):
        raise RequestError(f"the prompt has {len(runs)} image placeholder runs for {len(counts)} images")
    out: list[int] = []
    cursor = 0
    for (start, end), count in zip(runs, counts):
        if start == 0 or end >= len(ids) or ids[start - 1] != VISION_START_ID or ids[end] != VISION_END_ID:
            raise RequestError("each <|image_pad|> run must sit between <|vision_start|> and <|vision_end|>")
        if end - start not in (1, count):
            raise RequestError(f"an image needs {count} <|image_pad|> tokens (or 1, to be expanded); "
                               f"the prompt has {end - start}")
        out += list(ids[cursor:start]) + [IMAGE_PAD_ID] * count
        cursor = end
    return out + list(ids[cursor:])


# --------------------------------------------------------------------------- chat messages


@dataclass(frozen=True)
class EncodedChat:
    input_ids: tuple[int, ...]
    images: ImageInputs | None


def _image_url(item: Mapping[str, Any]) -> Any:
    """The payload of an OpenAI `image_url` part (`{"url": ...}` or a bare string) or of an `image` item."""
    return image_payload(item)


def normalise_messages(messages: Any, max_images: int, max_image_bytes: int) -> tuple[list[dict], list[bytes]]:
    """OpenAI chat messages -> template messages (image items reduced to `{"type": "image"}` placeholders)
    plus each image's bytes in order. Unknown part types and images in roles the template drops are 400s."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    out: list[dict] = []
    images: list[bytes] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestError(f"messages[{index}] must be an object")
        role, content = message.get("role"), message.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise RequestError(f"messages[{index}].content must be a string or a list of parts")
        parts: list[dict] = []
        for part in content:
            if not isinstance(part, Mapping):
                raise RequestError(f"messages[{index}].content parts must be objects")
            if is_image_item(part):
                if len(images) >= max_images:
                    raise RequestError(f"more than {max_images} images in one request")
                images.append(decode_data_url(_image_url(part), max_image_bytes))
                parts.append({"type": "image"})
            elif part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise RequestError(f"messages[{index}]: unsupported content part type {part.get('type')!r}")
        out.append({"role": role, "content": parts})
    return out, images


def encode_openai_chat(messages: Any, tokenizer: Any, cfg: ImageProcessorConfig, *,
                       tools: Sequence[Any] | None = None, max_images: int = 64,
                       max_image_bytes: int = 32 * 2**20,
                       max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS) -> EncodedChat:
    """An OpenAI chat request's messages -> prompt ids (generation prompt appended, image pads expanded)
    and the images' processor output, through the same `encode_chat` the trainer uses."""
    template_messages, encoded = normalise_messages(messages, max_images, max_image_bytes)
    arrays = [decode_image(b, max_decoded_pixels) for b in encoded]
    try:
        enc = encode_chat(template_messages, tokenizer, cfg, tools=tools, add_generation_prompt=True,
                          images=arrays if arrays else None)
    except ChatEncodingError as exc:
        raise RequestError(str(exc)) from None
    images = None
    if enc.pixel_values is not None:
        images = ImageInputs(pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw,
                             encoded=tuple(encoded))
    return EncodedChat(tuple(int(i) for i in enc.input_ids), images)


# --------------------------------------------------------------------------- stop strings


def single_token_stops(stops: Sequence[str], tokenizer: Any) -> tuple[int, ...]:
    """Stop strings that are one token (`</tool_call>`, `<|im_end|>`): the engine can stop on them exactly."""
    ids = []
    for stop in stops:
        encoded = tokenizer.encode(stop, add_special_tokens=False)
        if len(encoded) == 1:
            ids.append(int(encoded[0]))
    return tuple(ids)


def cut_at_stop(output_ids: Sequence[int], tokenizer: Any, stops: Sequence[str],
                skip_special_tokens: bool = True) -> tuple[int, str, str | None]:
    """Apply stop strings after generation: (tokens kept, text without the stop, matched stop or None).

    The engine only stops on token ids, so a multi-token stop string is found in the decoded text and the
    ids are cut at the shortest prefix whose text contains it (binary search over prefixes), keeping ids,
    logprobs and text consistent the way SGLang's own stop-string matching does."""
    text = tokenizer.decode(list(output_ids), skip_special_tokens=skip_special_tokens)
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return len(output_ids), text, None
    position, matched = min(hits)

    def contains(k: int) -> bool:
        return matched in tokenizer.decode(list(output_ids[:k]), skip_special_tokens=skip_special_tokens)

    lo, hi = 1, len(output_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if contains(mid) else (mid + 1, hi)
    return lo, text[:position], matched


def stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings")
    return [s for s in stops if s]
