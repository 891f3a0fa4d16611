# The two commands of the README (both set up .venv first when needed):
#   make run    the main job on the embedded default, headless; prints where its run folder and figures are
#   make test   the tests, including every notebook through pytest --nbval (.ci/run runs exactly this)

PYTHON ?= python3
# installed first and explicitly, so pip takes the local CPU build rather than a multi-GB CUDA one
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test setup

run: $(VENV)/.installed
	bash scripts/run_default.sh

test: $(VENV)/.installed
	$(PY) -m pytest --nbval-lax --nbval-current-env tests notebooks

setup: $(VENV)/.installed

# re-installs whenever the dependencies (pyproject.toml) change
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@
