# The two README commands: `make quickstart` and `make test`. Both create .venv when missing
# and install segpipe (editable) with everything it needs into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: quickstart test install clean-data

install: $(STAMP)

# torch/torchvision are pinned to the builds that pip takes from this machine kind's local disk;
# everything else comes from pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/segpipe quickstart

# two pytest-xdist workers (most of the suite waits on processes it started: Ray, MLflow servers,
# DVC); a module whose tests share a module-scoped fixture is one xdist_group, run by one worker.
# -v names each test as it starts and ends, so a CI log's tail says which test was running; a worker
# that dies (pytest-timeout ends a hung test with os._exit) is not replaced: pytest-xdist's loadgroup
# scheduler can deadlock when it re-queues a crashed worker's groups, so the run fails at once instead
test: $(STAMP)
	$(BIN)/python -m pytest -v -n 2 --dist loadgroup --max-worker-restart=0 --durations=25

clean-data:
	rm -rf data/raw data/shards data/.raw-new data/.shards-new

# the suite's three folders (make test runs them all): unit < 1 min, no Ray / MLflow server
.PHONY: test-unit test-integration test-cluster
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit
test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --max-worker-restart=0 --durations=15 tests/integration
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --max-worker-restart=0 --durations=15 tests/cluster
