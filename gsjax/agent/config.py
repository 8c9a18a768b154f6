"""Typed configuration for the agent loop, the policy client and the tools.

Defaults are the upstream budgets (spec/agent.md §2.5, §5). Everything read from the
environment goes through `from_env` so a run is reproducible from its recorded config; API keys
are wrapped in `Secret`, whose repr never shows the value, so dumping a config cannot leak a key.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gsjax.agent.prompts import SYSTEM_PROMPT_STYLES

CACHE_MODES = ("off", "record", "replay", "replay-or-record")


@dataclass(frozen=True)
class Secret:
    """An API key (or a comma-separated list of them). `repr`/`str` never show the value."""

    value: str = field(repr=False, default="")

    def reveal(self) -> str:
        return self.value

    def keys(self) -> tuple[str, ...]:
        """The comma-separated keys, stripped and non-empty (JINA_API_KEYS may hold several)."""
        return tuple(k.strip() for k in self.value.split(",") if k.strip())

    def __bool__(self) -> bool:
        return bool(self.keys())

    def __str__(self) -> str:
        return "***" if self.value else ""


@dataclass(frozen=True)
class RetryConfig:
    """Bounded retries with exponential backoff and jitter, all under one total deadline."""

    max_attempts: int = 4
    base_delay_s: float = 1.0
    max_delay_s: float = 20.0
    request_timeout_s: float = 30.0
    deadline_s: float = 60.0


@dataclass(frozen=True)
class AgentConfig:
    """Episode budgets and image handling (spec §2.5; gsjax fixes §8 items 5, 6, 10)."""

    max_llm_calls: int = 9
    max_new_tokens_per_turn: int = 4096
    max_tool_calls_advertised: int = 8
    max_reference_images: int = 3
    max_images_per_search_for_model: int = 5
    max_rendered_search_items: int = 10
    image_max_pixels: int = 160_000
    image_min_pixels: int = 65_536
    image_factor: int = 32
    date: str = field(default_factory=lambda: _dt.date.today().isoformat())
    episode_concurrency: int = 5
    system_prompt: str = "full"  # or "compact" (prompts.py): same protocol, ~1/4 of the tokens

    def __post_init__(self) -> None:
        if self.max_llm_calls < 1:
            raise ValueError(f"AgentConfig.max_llm_calls must be >= 1, got {self.max_llm_calls}")
        if self.max_reference_images < 1:
            raise ValueError(f"AgentConfig.max_reference_images must be >= 1, got {self.max_reference_images}")
        _dt.date.fromisoformat(self.date)  # a bad date string names itself in the ValueError
        if self.system_prompt not in SYSTEM_PROMPT_STYLES:
            raise ValueError(f"AgentConfig.system_prompt must be one of {', '.join(SYSTEM_PROMPT_STYLES)}, "
                             f"got {self.system_prompt!r}")


@dataclass(frozen=True)
class PolicyConfig:
    """An OpenAI-compatible chat endpoint serving the policy (inference sampling defaults)."""

    base_url: str = "http://127.0.0.1:8001/v1"
    model: str = "Gen-Searcher-8B"
    api_key: Secret = Secret("EMPTY")
    temperature: float = 0.6
    top_p: float = 0.9
    retry: RetryConfig = RetryConfig(max_attempts=3, base_delay_s=1.0, request_timeout_s=3600.0, deadline_s=7200.0)


@dataclass(frozen=True)
class ToolsConfig:
    """Endpoints, keys and limits of the three web tools (spec §5, env vars §5.5)."""

    backend: str = "serper"  # serper | local
    serper_key: Secret = Secret()
    text_search_url: str = "https://google.serper.dev/search"
    image_search_url: str = "https://google.serper.dev/images"
    search_top_k: int = 5
    search_max_top_k: int = 10
    search_max_queries: int = 5
    image_top_k: int = 5
    image_max_results: int = 5
    image_candidates: int = 10
    image_candidates_fallback: int = 20
    image_max_bytes: int = 15 * 1024 * 1024
    image_min_bytes: int = 1024
    image_max_decoded_pixels: int = 50_000_000
    image_jpeg_quality: int = 85
    image_download_concurrency: int = 4
    image_user_agent: str = (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36"
    )
    jina_keys: Secret = Secret()
    jina_base_url: str = "https://r.jina.ai"
    max_page_chars: int = 400_000
    max_urls_per_browse: int = 5
    summary_base_url: str = "http://127.0.0.1:8002/v1"
    summary_model: str = "Qwen3-VL-30B-A3B-Instruct"
    summary_api_key: Secret = Secret("EMPTY")
    summary_max_tokens: int = 8192
    summary_chunk_tokens: int = 95_000
    summary_chunk_overlap: int = 1024
    summary_raw_fallback_chars: int = 120_000
    allow_private_urls: bool = False
    per_tool_concurrency: int = 16
    tool_deadline_s: float = 60.0  # search and image_search: a bounded call, then an explicit result
    browse_deadline_s: float = 900.0  # reading + summarising a long page legitimately takes minutes
    retry: RetryConfig = RetryConfig()
    reader_retry: RetryConfig = RetryConfig(max_attempts=4, base_delay_s=1.0, request_timeout_s=50.0, deadline_s=180.0)
    download_retry: RetryConfig = RetryConfig(max_attempts=2, base_delay_s=0.5, request_timeout_s=30.0, deadline_s=40.0)
    summary_retry: RetryConfig = RetryConfig(max_attempts=3, request_timeout_s=300.0, deadline_s=600.0)
    local_corpus_dir: str = ""  # empty: the built-in corpus in gsjax/assets/corpus


def _int(env: Mapping[str, str], name: str, default: int, minimum: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from exc
    return max(minimum, value) if minimum is not None else value


def agent_config_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> AgentConfig:
    """AgentConfig with MAX_LLM_CALL_PER_RUN, GEN_MAX_NEW_TOKENS_PER_TURN, QWEN_VL_MAX_PIXELS applied."""
    env = os.environ if env is None else env
    base = AgentConfig(
        max_llm_calls=_int(env, "MAX_LLM_CALL_PER_RUN", 9, minimum=1),
        max_new_tokens_per_turn=_int(env, "GEN_MAX_NEW_TOKENS_PER_TURN", 4096, minimum=1),
        image_max_pixels=_int(env, "QWEN_VL_MAX_PIXELS", 160_000, minimum=1024),
    )
    return dataclasses.replace(base, **overrides)


def tools_config_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> ToolsConfig:
    """ToolsConfig from the upstream environment variables (spec §5.5)."""
    env = os.environ if env is None else env
    d = ToolsConfig()
    base = ToolsConfig(
        serper_key=Secret(env.get("SERPER_KEY_ID", "")),
        text_search_url=env.get("TEXT_SEARCH_API_BASE_URL") or d.text_search_url,
        image_search_url=env.get("IMAGE_SEARCH_API_BASE_URL") or d.image_search_url,
        image_user_agent=env.get("IMG_DL_UA") or d.image_user_agent,
        jina_keys=Secret(env.get("JINA_API_KEYS", "")),
        summary_base_url=env.get("BROWSE_SUMMARY_BASE_URL") or d.summary_base_url,
        summary_model=env.get("BROWSE_SUMMARY_MODEL") or d.summary_model,
        summary_api_key=Secret(env.get("BROWSE_SUMMARY_API_KEY") or "EMPTY"),
    )
    return dataclasses.replace(base, **overrides)


def policy_config_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> PolicyConfig:
    """PolicyConfig from GSJAX_POLICY_URL / GSJAX_POLICY_MODEL / GSJAX_POLICY_API_KEY."""
    env = os.environ if env is None else env
    d = PolicyConfig()
    base = PolicyConfig(
        base_url=env.get("GSJAX_POLICY_URL") or d.base_url,
        model=env.get("GSJAX_POLICY_MODEL") or d.model,
        api_key=Secret(env.get("GSJAX_POLICY_API_KEY") or "EMPTY"),
    )
    return dataclasses.replace(base, **overrides)


def public_dict(obj: Any) -> Any:
    """A JSON-ready view of a config dataclass with every Secret replaced by a presence flag."""
    if isinstance(obj, Secret):
        return "<set>" if obj else "<unset>"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: public_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [public_dict(x) for x in obj]
    return obj
