# Two commands a new machine needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The labextension sources: a change rebuilds the extension on the next `make env`.
LABEXT_SRC := $(shell find labextension/src labextension/style labextension/schema -type f 2>/dev/null) \
              labextension/package.json labextension/package-lock.json

# The kernel suite (every test but browser and soak tests) also runs on each of these
# Pythons that is present, each in its own .venv-X.Y; LOWEST_PY's gets the lowest
# dependency versions pyproject.toml allows (LOWEST). A missing Python is skipped.
# The suites run side by side (SUITES_AT_ONCE): a kernel test spends most of its time
# waiting on a kernel, a worker or a timeout (one suite keeps a third of one core busy),
# and each session keeps its temporary files and its leftover checks to itself.
OTHER_PYS ?= 3.10 3.12 3.13
SUITES_AT_ONCE ?= 4
LOWEST_PY ?= 3.10
LOWEST := tests/constraints-lowest.txt
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo "$$HOME/.pyenv")
# The newest X.Y.Z under pyenv, else pythonX.Y on PATH; empty when neither exists.
find_py = $(or $(shell ls -d $(PYENV_ROOT)/versions/$(1).*/bin/python$(1) 2>/dev/null | sort -V | tail -n1),$(shell command -v python$(1) 2>/dev/null))

.PHONY: env demo test lint bench soak lab chromium clean test-suites test-main FORCE

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
	@$(MAKE) --no-print-directory -k -j$(SUITES_AT_ONCE) --output-sync=target test-suites

# Each suite's output is shown whole when it ends; every suite runs even when one fails,
# and any failure fails the target. A Python that is not here is named and skipped.
PRESENT_PYS := $(foreach v,$(OTHER_PYS),$(if $(call find_py,$(v)),$(v)))
MISSING_PYS := $(filter-out $(PRESENT_PYS),$(OTHER_PYS))
test-suites: test-main $(addprefix test-py-,$(PRESENT_PYS))
	@$(foreach v,$(MISSING_PYS),echo "Python $(v) not found (neither under $(PYENV_ROOT)/versions nor python$(v) on PATH): its kernel suite is skipped";)

test-main: env
	@echo "all tests on $$($(BIN)/python -c 'import sys; print("Python", sys.version.split()[0])')"
	@$(BIN)/python -m pytest -q -m "not soak" || { echo "the tests failed on Python $$($(BIN)/python -c 'import sys; print(sys.version.split()[0])') (output above)"; exit 1; }

test-py-%: .venv-%/.installed FORCE
	@echo "kernel suite on $$(.venv-$*/bin/python -c 'import sys, IPython, ipykernel, ipywidgets; print("Python", sys.version.split()[0], "with IPython", IPython.__version__, "ipykernel", ipykernel.__version__, "ipywidgets", ipywidgets.__version__)')"
	@.venv-$*/bin/python -m pytest -q -m "not soak and not browser" || { echo "the kernel suite failed on Python $* (output above)"; exit 1; }

# Made anew whenever pyproject.toml or the constraints change, so a lowered pin takes effect.
# Kept (not an intermediate file make deletes), so the next `make test` reuses the environment.
.PRECIOUS: .venv-%/.installed
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
