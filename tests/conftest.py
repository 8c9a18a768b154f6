"""Shared pytest setup: fixtures used by several test packages, and the GPU marker."""

from __future__ import annotations

from gsjax.malloc import keep_freed_memory

keep_freed_memory()  # as the CLIs do, before JAX starts its threads: XLA CPU steps reuse freed pages

import jax  # noqa: E402
import pytest  # noqa: E402

pytest_plugins = ["tests.processor_fixtures"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `slow` run first, so that with two CI workers (`make test`, which keeps this order with
    --no-loadscope-reorder) the longest files start while the other worker takes the many short ones. Tests
    marked `gpu` need an accelerator; on a CPU-only machine they are skipped, never failed."""
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: file order is kept otherwise
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU/TPU accelerator (jax backend is cpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
