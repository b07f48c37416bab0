# The two commands of the quick start: `make demo` and `make test`.
# Each creates .venv and installs what it needs when it is missing or stale.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit fuzz bench clean image image-test

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

# Two workers (pytest-xdist): most of the suite's time is real processes and real time
# (tokens of seconds, Redis stopped and started), which overlap; coverage is combined.
unit: $(STAMP) tools
	$(BIN)/python -m pytest -n 2 --cov --cov-report=term

test: lint typecheck unit

# $(call apt_install,PACKAGES,UNITS): Debian's PACKAGES installed as root, in a subshell. A
# policy-rc.d (unless one exists already) refuses the services they would start, and UNITS are
# left disabled: the tests and benchmarks start their own.
define apt_install
( set -e; policy=/usr/sbin/policy-rc.d; \
  if [ ! -e $$policy ]; then \
    printf '#!/bin/sh\nexit 101\n' >$$policy; chmod 755 $$policy; trap "rm -f $$policy" EXIT; \
  fi; \
  apt-get update -qq; \
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1); \
  if [ -d /run/systemd/system ]; then systemctl disable -q $(2); fi )
endef

# promtool and prometheus, for the tests of deploy/prometheus/ and deploy/grafana/, and
# redis-server, for the tests of fleet mode: Debian's packages, installed as root when one is
# missing. A policy-rc.d (unless one exists already) refuses the services the packages would
# start, and they are left disabled: the tests start their own.
.PHONY: tools
tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null \
	    || ! command -v redis-server >/dev/null; then \
	  $(call apt_install,prometheus redis-server,prometheus redis-server); \
	fi

# The container image, token-broker:VERSION, built from deploy/Dockerfile with no network: a
# wheelhouse built here, a bookworm base made with debootstrap (BASE=IMAGE to use another one
# Docker already has). dockerd.sh starts Docker for the build if it is not running, and stops
# it after. image-test builds, then runs the image against the emulator (tests/image/).
image: $(STAMP) image-tools
	deploy/image/dockerd.sh env PYTHON=$(BIN)/python deploy/image/build.sh

image-test: $(STAMP) image-tools
	deploy/image/dockerd.sh sh -c 'PYTHON=$(BIN)/python deploy/image/build.sh \
	  && $(BIN)/python -m pytest -p no:cacheprovider --image tests/image'

# docker.io and debootstrap, for `make image` and `make image-test`: Debian's packages, installed
# the same way when either is missing (the policy-rc.d keeps dockerd from starting on install;
# deploy/image/dockerd.sh starts it when it is needed and stops it after).
.PHONY: image-tools
image-tools:
	@if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then \
	  $(call apt_install,docker.io debootstrap,docker.service docker.socket); \
	fi

# The property-based tests of hostile input with a large budget (make test runs a small one).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -m fuzz -p no:cacheprovider --hypothesis-show-statistics

# Throughput, latency, memory and start-up against the emulator, and fleet mode with a
# redis-server (about 20 minutes), with wrk, h2load and nginx from Debian's packages
# (installed as root when one is missing, services left stopped); writes
# bench/results/latest.json, docs/benchmarks.md and docs/benchmarks-rps.png.
# SECTIONS=throughput,proxy,storm,scale,hammer,idle,fleet runs some of them (the others are
# kept from the last file, each with its date).
bench: $(STAMP) bench-tools
	@$(BIN)/python -m pip install -qq -e '.[dev,emulator,bench]'
	SECTIONS=$(SECTIONS) $(BIN)/python bench/run.py
	$(BIN)/python bench/report.py

.PHONY: bench-tools
bench-tools:
	@if ! command -v wrk >/dev/null || ! command -v h2load >/dev/null \
	    || { ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; }; then \
	  $(call apt_install,wrk nghttp2-client nginx,nginx); \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage build/wheelhouse build/dockerd.log
