# The few entry points a newcomer needs. Each target installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test test-unit test-integration test-smoke lint bench demo clean

STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

test: $(STAMP)
	tools/setup-memcached.sh
	$(BIN)/python -m pytest tests integration -q

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests -q

test-integration: $(STAMP)
	tools/setup-memcached.sh
	$(BIN)/python -m pytest integration -q

test-smoke: $(STAMP)
	tools/setup-memcached.sh
	$(BIN)/python -m pytest integration -m smoke -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	tools/setup-memcached.sh
	$(BIN)/python -m benchmarks.ring_bench
	$(BIN)/python -m benchmarks.client_bench
	$(BIN)/python -m benchmarks.failover_bench
	$(BIN)/python -m benchmarks.scaling_bench
	$(BIN)/python -m benchmarks.cas_bench
	$(BIN)/python -m benchmarks.django_bench

demo: $(STAMP)
	tools/setup-memcached.sh
	$(BIN)/python -m examples.demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
