# Two commands for a fresh machine: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## the whole chain on the built-in corpus, on a local Ray
	$(BIN)/mm demo

test: $(STAMP)  ## lint + the test suite (slow/fault-injection tests excluded)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-slow: $(STAMP)  ## only the slow and fault-injection tests
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)  ## everything
	$(BIN)/python -m pytest -m ''

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf demo_out .pytest_cache .ruff_cache
