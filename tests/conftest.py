"""Shared pytest setup: fixtures used by several test packages, and the GPU marker."""

from __future__ import annotations

from gsjax.malloc import keep_freed_memory

keep_freed_memory()  # as the CLIs do, before JAX starts its threads: XLA CPU steps reuse freed pages

import importlib.util  # noqa: E402
import os  # noqa: E402
from importlib.metadata import entry_points  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from gsjax.compile_cache import use_compile_cache  # noqa: E402

pytest_plugins = ["tests.processor_fixtures", "tests.agent.web_fixture"]


FULL_DEMO_ENV = "GSJAX_FULL_DEMO_TESTS"
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def accelerator_plugin_installed() -> bool:
    """A GPU/TPU PJRT plugin is installed: the level would apply to its kernels too, so it is left alone."""
    return (bool(entry_points(group="jax_plugins")) or importlib.util.find_spec("jax_plugins") is not None
            or importlib.util.find_spec("libtpu") is not None)


def compile_fast() -> None:
    """XLA:CPU compiles with LLVM at -O0 in tests (and in every subprocess they start, which inherits the
    environment). The suite compiles hundreds of tiny programs and runs few steps of each, so compiling is
    most of its time: measured on the 2-core CI machine, `make test` took 20m34s instead of 23m18s (user CPU
    35 min instead of 42), while the few tests that run many steps got up to 10 % slower. It changes how fast
    the generated code runs, not the program (the same HLO after XLA's own passes); the suite's comparisons
    run both sides under the same flags or hold a tolerance. The default-size demo test drops XLA_FLAGS and
    runs as users do (at -O0 its 500 SFT steps take ~3x longer). GSJAX_TEST_XLA_OPT=default keeps XLA's
    default level, e.g. to time a test; a machine with a GPU/TPU plugin keeps it too."""
    if os.environ.get("GSJAX_TEST_XLA_OPT") == "default" or accelerator_plugin_installed():
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()


def pytest_configure(config: pytest.Config) -> None:
    """One persistent XLA compilation cache for the whole test run, shared by both xdist workers and every
    subprocess a test starts (they inherit the environment): many tests build a new Learner, sampler or run
    over the same tiny model and shapes, and on a 2-core CPU compiling is most of their time. Entries are keyed
    by the program, compile options and jax version, so a hit computes what a fresh compile would.
    GSJAX_TEST_COMPILE_CACHE=off turns it off; a path puts it elsewhere."""
    compile_fast()  # before any test module asks JAX for its devices, which reads XLA_FLAGS once
    setting = os.environ.get("GSJAX_TEST_COMPILE_CACHE", str(Path(config.rootpath) / ".pytest_cache" / "xla"))
    if setting == "off":
        return
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", setting)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    use_compile_cache(os.environ["JAX_COMPILATION_CACHE_DIR"],  # this process; the variables: its children
                      min_compile_seconds=float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `slow` run first, so that with two CI workers (`make test`, which keeps this order with
    --no-loadscope-reorder) the longest files start while the other worker takes the many short ones. Tests
    marked `gpu` need an accelerator; on a CPU-only machine they are skipped, never failed. Tests marked
    `full_demo` run the demo at its default size and only when asked (`GSJAX_FULL_DEMO_TESTS=1`): 4.5 minutes
    alone, and their outcome (a tiny model's greedy turns after 500 steps) can move with a CPU's float
    summation order."""
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: file order is kept otherwise
    if os.environ.get(FULL_DEMO_ENV) != "1":
        skip_demo = pytest.mark.skip(reason=f"the default-size demo run (about 4.5 min alone on 2 "
                                            f"cores); set {FULL_DEMO_ENV}=1 to run it")
        for item in items:
            if "full_demo" in item.keywords:
                item.add_marker(skip_demo)
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU/TPU accelerator (jax backend is cpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
