# serve_app: `make run` serves configs/local.yaml on 127.0.0.1:8000; `make test` runs the fast
# tier, `make test-scenarios` the multi-minute scenarios; .ci/run runs both.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install run check test test-scenarios scenario-deps bench train clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/serve-app train

# Trains the default model if the store is empty, then serves in the foreground.
# MODEL=NAME serves that stored model instead of the config's (e.g. make run MODEL=churn).
run: $(STAMP)
	$(BIN)/serve-app run --config $(CONFIG)$(if $(MODEL), --model $(MODEL))

# The layer contracts in pyproject.toml ([tool.importlinter]) and the type checker.
check: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/mypy

# The checks, then everything but the multi-minute scenarios, in a random order: pytest-randomly
# prints its seed; PYTEST_ARGS=--randomly-seed=N repeats an order, -p no:randomly keeps the written one.
test: check
	$(BIN)/python -m pytest -m "not scenario" $(PYTEST_ARGS)

# The README walkthrough (two `make run`s), a 3-node cluster, bench and tune runs, chaos and
# the browser: each starts Ray clusters of its own, so they run in their written order.
test-scenarios: $(STAMP) scenario-deps
	$(BIN)/python -m pytest -m scenario -p no:randomly $(PYTEST_ARGS)

# Debian packages the scenarios drive: Chromium renders the dashboard, wrk loads the bench.
scenario-deps:
	@missing=""; for tool in chromium wrk; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make test-scenarios needs these Debian packages:$$missing (sudo apt-get install$$missing)"; exit 1; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq $$missing >/dev/null || (apt-get update -qq && apt-get install -y -qq $$missing >/dev/null); \
	fi

# wrk is the load generator (Debian package); without it the bench falls back to a slower
# Python client and says so in its table. BENCH_ARGS: more `serve-app bench` options (--quick).
bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get install -y wrk || (apt-get update && apt-get install -y wrk)) || true
	$(BIN)/serve-app bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
