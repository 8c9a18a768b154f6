"""Installed versions of the packages that decide gsjax's numerics and speed, for `gsjax --version` and for
every benchmark record (a figure without its jax/flax/torch versions cannot be compared with a later one)."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

NUMERIC_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
REFERENCE_PACKAGES = ("torch", "transformers")  # the other side of every comparison benchmark


def package_versions(names: Sequence[str] = NUMERIC_PACKAGES) -> dict[str, str]:
    """{distribution name: installed version, or "not installed"}, in the order asked."""
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
