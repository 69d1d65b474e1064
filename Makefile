# varstack: the two commands a new user needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install only when the project's metadata changed.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint pytest test-slow netns-tools venv clean tools e2e chaos bench

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

## make run: the whole topology on this machine (embedded PostgreSQL by default).
run: $(STAMP)
	exec $(PY) -m stack

## make lint: ruff and mypy.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## make pytest: the test suite alone, without the long scenarios (PYTEST_ARGS='-k name' to
## narrow it; PYTEST_ARGS='' for everything).
PYTEST_ARGS ?= -m 'not slow'
pytest: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

## make test-slow: the long scenarios only (network-namespace blackhole, thousands of fuzzed
## requests, hundreds of slowloris sockets; root for the namespaces). .ci/run runs them.
test-slow: $(STAMP) netns-tools
	$(VENV)/bin/pytest -m slow

## As root, the network-namespace tools of the blackhole scenario (Debian's iproute2 and
## iptables, with --no-install-recommends); without them that scenario is skipped.
netns-tools:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && ! { command -v ip && command -v iptables; } >/dev/null 2>&1; then \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends iproute2 iptables; } \
	  || echo "could not install iproute2 and iptables: the blackhole scenario will be skipped"; fi

## make chaos: the whole stack (own PostgreSQL, 3 replicas, balancer) under faults, with a
## verdict table; exit 1 on any loss. CHAOS_ARGS='--quick' for a ~1 min run,
## CHAOS_ARGS='--url http://127.0.0.1:3000' to load-and-check a running `make run` (no faults).
chaos: $(STAMP)
	$(PY) -m chaos run $(CHAOS_ARGS)

## make tools: what the static deployment tests need that pip cannot install (Debian's
## docker-compose 1.29.2 validates compose files with no engine). Root only; a no-op when present.
tools:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends docker-compose; \
	  else echo "docker-compose missing: the compose validation tests will be skipped" \
	    "(sudo apt-get install --no-install-recommends docker-compose)"; fi; }

## make test: lint, type-check and the test suite, under asyncio and uvloop.
test: tools lint pytest

## make e2e: build the images and run compose.yaml for real under podman, checked through :3000.
## Root; installs podman (apt), podman-compose (own venv) and local base images (cached in
## /var/cache/varstack and podman's store); removes its project's containers/network/volume.
e2e:
	$(PYTHON) e2e/compose_e2e.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

## make bench: wrk and hey against the balancer, the service and the whole stack, side by side
## with HAProxy; report + plots in bench/results/. Installs wrk, hey, haproxy, nginx-light from
## Debian when root (a missing tool skips its comparison). BENCH_ARGS='--quick' for a ~2 min
## smoke run, BENCH_ARGS='--target http://127.0.0.1:3000' to measure a running stack.
BENCH_STAMP := $(VENV)/.bench-$(shell cksum pyproject.toml | cut -d' ' -f1)
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	@rm -f $(VENV)/.bench-*
	@touch $@

bench: $(BENCH_STAMP)
	$(PY) -m bench $(BENCH_ARGS)
