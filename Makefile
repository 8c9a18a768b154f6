# Two entry points, each creating .venv on first use (README Quickstart).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch wheel first, pinned, so nothing later resolves a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,serve]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gsjax demo

test: $(STAMP)
	XLA_FLAGS="$${XLA_FLAGS:---xla_force_host_platform_device_count=8}" $(BIN)/pytest -q -x -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

clean:
	rm -rf $(VENV) .pytest_cache
