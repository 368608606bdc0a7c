PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# What is installed, one stamp per extra: `serve` needs only the server extra; everything
# else the dev set, which includes it (so `make serve` after `make test` installs nothing,
# and `make test` after `make serve` adds the dev set).
SERVER := $(VENV)/.installed-server
DEV := $(VENV)/.installed-dev

.PHONY: venv test lint typecheck pytest serve bench soak format clean

venv: $(DEV)

# A current pip in the venv: it resolves several times faster than the one Python bundles.
# The interpreter's own pip installs it when it can (`pip --python`, seconds faster than
# ensurepip); else ensurepip, then an upgrade.
$(BIN)/pip:
	$(PYTHON) -m venv --without-pip $(VENV)
	if $(PYTHON) -m pip --python $(BIN)/python --version >/dev/null 2>&1; then \
		$(PYTHON) -m pip --python $(BIN)/python install --quiet --upgrade pip; \
	else \
		$(BIN)/python -m ensurepip && $(BIN)/python -m pip install --quiet --upgrade pip; \
	fi

$(SERVER): pyproject.toml | $(BIN)/pip
	$(BIN)/pip install --quiet --no-compile -e '.[server]'
	touch $@

$(DEV): pyproject.toml | $(BIN)/pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(SERVER)

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

serve: $(SERVER)
	$(BIN)/quotagate serve

bench: venv
	$(BIN)/python -m tests.perf.bench_service
	$(BIN)/python -m tests.perf.goodput
	$(BIN)/python -m tests.perf.decisions

soak: venv
	$(BIN)/python -m tests.perf.soak

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
