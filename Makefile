# serve_app: `make run` serves configs/local.yaml on 127.0.0.1:8000; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=

.PHONY: install run test bench bench-smoke train clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/serve-app train

# Trains the default model if the store is empty, then serves in the foreground.
run: $(STAMP)
	$(BIN)/serve-app run --config $(CONFIG)

test: $(STAMP)
	command -v chromium >/dev/null || (export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null))
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# wrk is the load generator (Debian package); without it the bench falls back to a slower
# Python client and says so in its table.
bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get install -y wrk || (apt-get update && apt-get install -y wrk)) || true
	$(BIN)/serve-app bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
