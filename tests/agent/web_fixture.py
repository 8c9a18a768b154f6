"""The loopback fake web (Serper, Jina, image hosts, an OpenAI policy) as a fixture, for the agent and eval
tests alike (a pytest plugin of tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.agent.fakes import FakeWeb


@pytest.fixture
def web() -> Iterator[FakeWeb]:
    fake = FakeWeb().start()
    try:
        yield fake
    finally:
        fake.stop()
