"""Shared fixtures for the processor/tokenizer/chat tests, loaded as a pytest plugin.

The offline tokenizer is built once per session into a temp cache dir (a few seconds), and the HF reference
processor is built from it once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gsjax.processor import ImageProcessorConfig, build_hf_processor, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gsjax-cache")


@pytest.fixture(scope="session")
def qwen_tokenizer(tokenizer_cache_dir: Path) -> Any:
    return load_tokenizer(cache_dir=tokenizer_cache_dir)


@pytest.fixture(scope="session")
def hf_processor(qwen_tokenizer: Any) -> Any:
    return build_hf_processor(qwen_tokenizer, ImageProcessorConfig())
