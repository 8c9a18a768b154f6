"""Fixtures for the agent tests: a loopback fake web and configs pointing at it with fast retries."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gsjax_agent_fakes import (
    JINA_KEYS,
    POLICY_KEY,
    SERPER_KEY,
    SUMMARY_KEY,
    SUMMARY_MODEL,
    FakeWeb,
)

from gsjax.agent.config import AgentConfig, PolicyConfig, RetryConfig, Secret, ToolsConfig

FAST_RETRY = RetryConfig(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05, request_timeout_s=0.6, deadline_s=5.0)


@pytest.fixture
def web() -> Iterator[FakeWeb]:
    fake = FakeWeb().start()
    try:
        yield fake
    finally:
        fake.stop()


def serper_config(web: FakeWeb, **overrides: object) -> ToolsConfig:
    base = dict(
        backend="serper", serper_key=Secret(SERPER_KEY), text_search_url=f"{web.base}/serper/search",
        image_search_url=f"{web.base}/serper/images", jina_keys=Secret(",".join(JINA_KEYS)),
        jina_base_url=f"{web.base}/jina", summary_base_url=f"{web.base}/v1", summary_model=SUMMARY_MODEL,
        summary_api_key=Secret(SUMMARY_KEY), allow_private_urls=True, retry=FAST_RETRY,
        download_retry=FAST_RETRY, summary_retry=FAST_RETRY, tool_deadline_s=10.0)
    base.update(overrides)
    return ToolsConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def tools_cfg(web: FakeWeb) -> ToolsConfig:
    return serper_config(web)


@pytest.fixture
def agent_cfg() -> AgentConfig:
    return AgentConfig(date="2025-06-01")


@pytest.fixture
def policy_cfg(web: FakeWeb) -> PolicyConfig:
    return PolicyConfig(base_url=f"{web.base}/v1", model="fake-policy", api_key=Secret(POLICY_KEY), retry=FAST_RETRY)
