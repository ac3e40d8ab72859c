# ml-connector: `make demo` runs the main job, `make test` passes the tests. Both do all set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test faults bench lint format services venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

services:
	@scripts/ensure-services.sh

demo: venv services
	$(BIN)/ml-connector db migrate
	$(BIN)/ml-connector demo

test: venv services
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -m "not faults"

faults: venv services
	$(BIN)/pytest -m faults tests/faults

bench: venv services
	$(BIN)/python -m bench.bus
	$(BIN)/python -m bench.audit
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.scaling
	$(BIN)/python -m bench.steady

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
