# Two commands a new machine needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: env demo test lint bench soak lab clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

lint: env
	$(BIN)/ruff check nbisolate tests benchmarks

test: env lint
	$(BIN)/python -m pytest -q -m "not soak"

demo: env
	$(BIN)/python notebooks/run_demo.py notebooks build/notebooks

bench: env
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m benchmarks.run

soak: env
	$(BIN)/python -m pytest -q -m soak -s

lab: env
	$(BIN)/python -m pip install -q jupyterlab
	$(BIN)/jupyter lab --allow-root notebooks

clean:
	rm -rf build .pytest_cache
