# Two commands a new machine needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The labextension sources: a change rebuilds the extension on the next `make env`.
LABEXT_SRC := $(shell find labextension/src labextension/style labextension/schema -type f 2>/dev/null) \
              labextension/package.json labextension/package-lock.json

.PHONY: env demo test lint bench soak lab chromium clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# An editable install with the test tools; the wheel build hook builds the
# JupyterLab extension (TypeScript, needs npm) when its output is missing.
$(STAMP): $(BIN)/python pyproject.toml $(LABEXT_SRC)
	@command -v npm >/dev/null || { echo "npm (Node 20+) is needed to build the JupyterLab extension"; exit 1; }
	rm -rf nbisolate/labextension
	$(BIN)/python -m pip install -q -e '.[test,dask]'
	touch $(STAMP)

env: $(STAMP)

lint: env
	$(BIN)/ruff check nbisolate tests benchmarks notebooks/run_demo.py

# The browser tests drive Debian's Chromium; without it they are skipped, and say why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium for the browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium unavailable: the browser tests will be skipped"; }

test: env lint chromium
	$(BIN)/python -m pytest -q -m "not soak"

demo: env
	$(BIN)/python notebooks/run_demo.py notebooks build/notebooks

bench: env
	$(BIN)/python -m pip install -q -e '.[test,dask,bench]'
	$(BIN)/python -m benchmarks.run

soak: env
	$(BIN)/python -m pytest -q -m soak -s

lab: env
	$(BIN)/jupyter lab --allow-root --LabApp.news_url=None notebooks

clean:
	rm -rf build .pytest_cache
