# hxb developer entry points. `make serve` and `make test` are the README's quickstart.
SHELL := /bin/bash
# An absolute interpreter: on some machines `python3` on PATH is a slow shim.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11 /usr/bin/python3.12 /usr/bin/python3.13 /usr/local/bin/python3.11) /usr/bin/python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 8080
DATA_DIR ?= .hxb

.PHONY: install serve test lint fmt type test-unit test-integration test-e2e bench check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	scripts/install-system-deps.sh --test
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

serve: install
	$(BIN)/hxb serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR) --demo

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

fmt: install
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

type: install
	$(BIN)/mypy src tests

test-unit: install
	$(BIN)/pytest tests/unit

test-integration: install
	$(BIN)/pytest tests/integration

test-e2e: install
	$(BIN)/pytest tests/e2e

# The whole suite, as CI runs it.
test: lint type
	$(BIN)/pytest tests

check: test

bench: install
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_sandbox.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
