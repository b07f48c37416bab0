# The two commands of the quick start: `make demo` and `make test`.
# Each creates .venv and installs what it needs when it is missing or stale.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit fuzz bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -qq -e '.[dev,emulator]'
	@touch $@

demo: $(STAMP)
	$(BIN)/token-broker demo

lint: $(STAMP)
	$(BIN)/ruff check broker tests bench
	$(BIN)/ruff format --check broker tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) tools
	$(BIN)/python -m pytest --cov --cov-report=term

test: lint typecheck unit

# promtool and prometheus, for the tests of deploy/prometheus/ and deploy/grafana/, and
# redis-server, for the tests of fleet mode: Debian's packages, installed as root when one is
# missing. A policy-rc.d (unless one exists already) refuses the services the packages would
# start, and they are left disabled: the tests start their own.
.PHONY: tools
tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null \
	    || ! command -v redis-server >/dev/null; then \
	  set -e; policy=/usr/sbin/policy-rc.d; \
	  if [ ! -e $$policy ]; then \
	    printf '#!/bin/sh\nexit 101\n' >$$policy; chmod 755 $$policy; trap "rm -f $$policy" EXIT; \
	  fi; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus redis-server; \
	  if [ -d /run/systemd/system ]; then systemctl disable -q prometheus redis-server; fi; \
	fi

# The property-based tests of hostile input with a large budget (make test runs a small one).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -m fuzz -p no:cacheprovider --hypothesis-show-statistics

# Throughput, latency, memory and start-up against the emulator (about 9 minutes);
# writes bench/results/latest.json, docs/benchmarks.md and docs/benchmarks-rps.png.
bench: $(STAMP)
	@$(BIN)/python -m pip install -qq -e '.[dev,emulator,bench]'
	$(BIN)/python bench/run.py
	$(BIN)/python bench/report.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
