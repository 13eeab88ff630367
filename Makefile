# Two commands do all the set-up: `make run` serves the embedded default, `make test` runs the tests.
# Both create .venv on first use (a few minutes) and reuse it afterwards.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
ARGS ?=

.PHONY: run test unit dashboards chart-memory lock bench clean

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed; set PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/zit up $(ARGS)

# The real tools the system tests drive (prometheus, chromium, helm) are installed by tests/tools/install.sh.
# lint-imports checks the layers (pyproject.toml [tool.importlinter], docs/architecture.md) before any test runs.
# Lifecycle tests start and stop whole Ray clusters (`ray stop` ends every Ray process), so they run on their own.
test: $(STAMP)
	bash tests/tools/install.sh
	$(BIN)/lint-imports
	$(BIN)/pytest -m "not lifecycle" $(PYTEST_ARGS)
	$(BIN)/pytest -m lifecycle $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# The chart's Grafana dashboards are built by k8s/dashboards.py (Grafana's SDK); commit what this writes.
dashboards: $(STAMP)
	$(BIN)/python k8s/dashboards.py

# Worker pod memory of the chart, from the host-memory model (cluster/host_memory.py); commit what this writes.
chart-memory: $(STAMP)
	$(BIN)/python k8s/pod_memory.py

bench: $(STAMP)
	$(BIN)/python -m bench.serve_overhead

lock: $(STAMP)
	( echo "# Exact versions the project is tested with; the Makefile and Dockerfile.gpu install with \`pip install -c requirements.lock\`."; \
	  echo "# Regenerate after changing dependencies: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^zit-cluster' | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' ) > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
