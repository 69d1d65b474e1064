# varstack: the two commands a new user needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install only when the project's metadata changed.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint pytest venv clean

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

## make pytest: the test suite alone (PYTEST_ARGS='-k name' to narrow it).
pytest: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

## make test: lint, type-check and the test suite, under asyncio and uvloop.
test: lint pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
