# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each first creates .venv with the pinned CPU stack when it is missing (seconds when it is there).
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= tiny
PYTEST_ARGS ?=

.PHONY: env demo test test-fast lab clean-runs

env:
	@bash env/setup_cpu.sh

demo: env
	$(PY) -m cookbook.cli demo --preset $(PRESET)

test: env
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: env
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

lab: env
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

clean-runs:
	rm -rf runs/
