# Two commands a new machine needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The labextension sources: a change rebuilds the extension on the next `make env`.
LABEXT_SRC := $(shell find labextension/src labextension/style labextension/schema -type f 2>/dev/null) \
              labextension/package.json labextension/package-lock.json

# The kernel suite (every test but browser and soak tests) also runs on each of these
# Pythons that is present, one after another, each in its own .venv-X.Y; LOWEST_PY's gets
# the lowest dependency versions pyproject.toml allows (LOWEST). A missing Python is skipped.
OTHER_PYS ?= 3.10 3.12 3.13
LOWEST_PY ?= 3.10
LOWEST := tests/constraints-lowest.txt
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo "$$HOME/.pyenv")
# The newest X.Y.Z under pyenv, else pythonX.Y on PATH; empty when neither exists.
find_py = $(or $(shell ls -d $(PYENV_ROOT)/versions/$(1).*/bin/python$(1) 2>/dev/null | sort -V | tail -n1),$(shell command -v python$(1) 2>/dev/null))

.PHONY: env demo test lint bench soak lab chromium clean test-pythons FORCE

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
	@$(MAKE) --no-print-directory test-pythons

# Every Python runs even when one fails; then the failures fail the target.
test-pythons:
	@failed=""; for v in $(OTHER_PYS); do \
	  $(MAKE) --no-print-directory test-py-$$v || failed="$$failed $$v"; \
	done; \
	if [ -n "$$failed" ]; then echo "the kernel suite failed on Python$$failed (output above)"; exit 1; fi

test-py-%: FORCE
	@if [ -z "$(call find_py,$*)" ]; then \
	  echo "Python $* not found (neither under $(PYENV_ROOT)/versions nor python$* on PATH): its kernel suite is skipped"; \
	else \
	  $(MAKE) --no-print-directory .venv-$*/.installed && \
	  echo "kernel suite on $$(.venv-$*/bin/python -c 'import sys, IPython, ipykernel, ipywidgets; print("Python", sys.version.split()[0], "with IPython", IPython.__version__, "ipykernel", ipykernel.__version__, "ipywidgets", ipywidgets.__version__)')" && \
	  .venv-$*/bin/python -m pytest -q -m "not soak and not browser"; \
	fi

# Made anew whenever pyproject.toml or the constraints change, so a lowered pin takes effect.
# The JupyterLab extension is already built by `env`; the editable install reuses it.
.venv-%/.installed: pyproject.toml $(LOWEST) | $(STAMP)
	rm -rf .venv-$*
	$(call find_py,$*) -m venv .venv-$*
	.venv-$*/bin/python -m pip install -q --upgrade pip
	.venv-$*/bin/python -m pip install -q -e '.[test,dask]' $(if $(filter $*,$(LOWEST_PY)),-c $(LOWEST))
	touch $@

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

# Pattern targets cannot be .PHONY (make would skip their rule); this runs them every time.
FORCE:
