# Everything a new machine needs is installed from here: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv demo test lint unit bench soak sim clean

all: test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/agentd demo

lint: $(STAMP)
	$(BIN)/ruff check agentd tests
	$(BIN)/ruff format --check agentd tests
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint unit

sim: $(STAMP)
	$(BIN)/agentd sim

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
