# The two commands of the README (both set up .venv first when needed):
#   make run    the main job on the embedded default, headless; prints where its run folder and figures are
#   make test   the tests, including every notebook through pytest --nbval (.ci/run runs this first,
#               then `make browser-check`)

PYTHON ?= python3
# installed first and explicitly, so pip takes the local CPU build rather than a multi-GB CUDA one
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test setup

run: $(VENV)/.installed
	bash scripts/run_default.sh

test: $(VENV)/.installed
	$(PY) -m pytest --nbval-lax --nbval-current-env --durations=15 tests notebooks

setup: $(VENV)/.installed

# re-installs whenever the dependencies (pyproject.toml) change
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Run by .ci/run after `make test` (not part of it: it installs a browser). The notebooks in a real JupyterLab
# under headless Chromium (Debian's chromium and chromium-driver, installed with apt when missing; no browser is
# downloaded by a Python package): notebook 05's slider moved and checked against render() of what the notebook
# holds, notebook 02's progress bar and live plot while it trains; screenshots to docs/. Stops every process it
# started; non-zero exit with a message on any failure. About 3-4 minutes, plus about 1 minute of apt the first time.
.PHONY: browser-check
browser-check: $(VENV)/.installed
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || { \
	  echo "installing chromium and chromium-driver (Debian packages)"; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }
	$(PY) -c "import selenium" 2>/dev/null || $(PY) -m pip install -q -e ".[browser]"
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) scripts/browser_check.py
