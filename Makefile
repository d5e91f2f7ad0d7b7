# sap: `make test` and `make demo` set everything up on a fresh machine.
# Each framework lives in its own environment (their pins conflict): see DESIGN.md.

PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints/core.txt
PIP_FLAGS   ?= --disable-pip-version-check -q
PYTEST_ARGS ?=

BIN := $(VENV)/bin

.PHONY: help install test test-fast lint format clean

help:
	@echo "make install     core environment ($(VENV)): sap, retriever, eval engines"
	@echo "make test        create what the tests need, then run every test"
	@echo "make test-fast   only the fast tests (no -m slow)"
	@echo "make lint        ruff"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp is rebuilt when the package metadata or the pins change.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) -c $(CONSTRAINTS) -e ".[dev,data,retriever,eval]"
	@touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks retriever
	$(BIN)/ruff format --check src tests benchmarks retriever

format: install
	$(BIN)/ruff check --fix src tests benchmarks retriever
	$(BIN)/ruff format src tests benchmarks retriever

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
