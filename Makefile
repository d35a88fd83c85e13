# Two commands from nothing:  `make demo` (set up + the main job)  and  `make test` (set up + the tests).
# TORCH picks the PyTorch build: the default is the CPU wheel this project is developed against;
# on a CUDA machine use e.g. `make demo TORCH=torch`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: setup demo paper test lint bench clean

$(BIN)/mixprec: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

setup: $(BIN)/mixprec

demo: setup
	$(BIN)/mixprec demo

paper: setup
	$(BIN)/mixprec paper

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/bench_quantize.py
	$(BIN)/python benchmarks/bench_masters.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
