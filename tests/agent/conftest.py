"""Fixtures for the agent tests: a loopback fake web and configs pointing at it with fast retries."""

from __future__ import annotations

import pytest

from gsjax.agent.config import AgentConfig, PolicyConfig, Secret, ToolsConfig
from tests.agent.fakes import FAST_RETRY, POLICY_KEY, FakeWeb, serper_config


@pytest.fixture
def tools_cfg(web: FakeWeb) -> ToolsConfig:
    return serper_config(web)


@pytest.fixture
def agent_cfg() -> AgentConfig:
    return AgentConfig(date="2025-06-01")


@pytest.fixture
def policy_cfg(web: FakeWeb) -> PolicyConfig:
    return PolicyConfig(base_url=f"{web.base}/v1", model="fake-policy", api_key=Secret(POLICY_KEY), retry=FAST_RETRY)
