# The few entry points a newcomer needs. Each target installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test test-unit test-integration test-smoke lint bench history demo clean

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

# The long history run (issue 11): each nemesis alone, then all of them, under each failover policy;
# HISTORY_S seconds each (default 60: about 12 minutes). Violations are expected where
# docs/consistency.md lists known gaps, so each run's exit status is reported, not fatal; the
# summary table is printed at the end and the reports are kept in $(HISTORY_DIR).
HISTORY_S ?= 60
HISTORY_DIR ?= history-results
HISTORY_RUNS := kill pause blackhole add remove reweight worker-kill add,remove \
	kill,pause,blackhole,add,remove,reweight,worker-kill

history: $(STAMP)
	tools/setup-memcached.sh
	rm -rf $(HISTORY_DIR) && mkdir -p $(HISTORY_DIR)
	seed=100; for n in $(HISTORY_RUNS); do seed=$$((seed + 1)); \
		$(BIN)/python -m benchmarks.history --seed $$seed --duration-s $(HISTORY_S) --nemesis $$n \
			--json $(HISTORY_DIR)/$$seed.json --out $(HISTORY_DIR)/run-$$seed > $(HISTORY_DIR)/$$seed.txt 2>&1; \
		echo "seed $$seed $$n: exit $$?"; done
	seed=110; for p in remap gutter; do seed=$$((seed + 1)); \
		$(BIN)/python -m benchmarks.history --seed $$seed --duration-s $(HISTORY_S) --failover $$p \
			--nemesis kill,pause,blackhole --json $(HISTORY_DIR)/$$p.json --out $(HISTORY_DIR)/run-$$p \
			> $(HISTORY_DIR)/$$p.txt 2>&1; echo "$$p: exit $$?"; done
	$(BIN)/python -m benchmarks.history --summary $(HISTORY_DIR)/*.json

demo: $(STAMP)
	tools/setup-memcached.sh
	$(BIN)/python -m examples.demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
