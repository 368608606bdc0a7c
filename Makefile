PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck pytest serve bench soak format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check coordinator client tests
	$(BIN)/ruff format --check coordinator client tests

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest -q

test: lint typecheck pytest

format: venv
	$(BIN)/ruff format coordinator client tests
	$(BIN)/ruff check --fix coordinator client tests

serve: venv
	$(BIN)/quotagate serve

bench: venv
	$(BIN)/python -m tests.perf.bench_service
	$(BIN)/python -m tests.perf.goodput
	$(BIN)/python -m tests.perf.decisions

soak: venv
	$(BIN)/python -m tests.perf.soak

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
