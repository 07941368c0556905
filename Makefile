# Two set-up commands for a newcomer: `make run` and `make test`. Each creates .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export LLMOPS_HOME ?= $(CURDIR)/.llmops
export DAGSTER_HOME ?= $(LLMOPS_HOME)/dagster_home
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test browser bench ui ui-operate lint db-stop serve-stop clean

# One pip command resolves the whole pinned stack (torch==2.13.0 is the CPU build on disk).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip check
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/llmops run

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/bandit -q -c pyproject.toml -r llmops_dagster assets resources schedules
	$(BIN)/pytest

# The page test drives Debian's Chromium (Playwright's own browser download does not work here).
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)

# Each benchmark records its figures; the last step writes them to benchmarks/results.md.
bench: $(STAMP)
	rm -f benchmarks/.results.jsonl
	$(BIN)/python benchmarks/bench_validation.py
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_serving.py
	$(BIN)/python benchmarks/bench_serving.py --model large
	$(BIN)/python benchmarks/bench_sensors.py
	$(BIN)/python benchmarks/bench_quality.py
	$(BIN)/python benchmarks/bench_loop.py
	$(BIN)/python benchmarks/bench_canary_judge.py
	$(BIN)/python benchmarks/results.py

# The Dagster webserver and daemon in a process group of their own: stop on Ctrl-C and SIGTERM, also
# started with `&` or nohup. `make ui` is read-only (browse); `make ui-operate` launches runs, on
# 127.0.0.1 under a secret path whose URL is in $(LLMOPS_HOME)/ui/operate_url (0600).
ui: $(STAMP)
	$(BIN)/llmops ui

ui-operate: $(STAMP)
	$(BIN)/llmops ui --operate

lint: $(STAMP)
	$(BIN)/ruff check .

db-stop: $(STAMP)
	$(BIN)/llmops db stop

serve-stop: $(STAMP)
	$(BIN)/llmops serve stop

# Ray's replicas use the database: stop them before the server.
clean: serve-stop db-stop
	rm -rf $(LLMOPS_HOME)
