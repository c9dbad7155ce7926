# One-command set-up: every target creates/reuses .venv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JAVA_ENV := $(VENV)/java.env
RUN := set -euo pipefail; . $(JAVA_ENV); export PYSPARK_PYTHON=$(abspath $(BIN))/python PYSPARK_DRIVER_PYTHON=$(abspath $(BIN))/python SPARK_LOCAL_IP=127.0.0.1;
PYTEST_ARGS ?=

.PHONY: install test lint docs demo bench clean compat-fixtures

install: $(STAMP)

$(STAMP): pyproject.toml Makefile .ci/java-env
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Without a CUDA device: torch 2.14.1 with its torchvision 0.29.1, both from this disk
	@# (the [vision] extra's ResNet tests need a torchvision built for the installed torch;
	@# none exists for the CPU-only torch 2.13.0 wheel here: "torchvision::nms does not
	@# exist"). A GPU machine gets the default (CUDA) builds through pyproject's ranges.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "CUDA device present: torch comes from pyproject's range (CUDA build)"; \
	else \
	  $(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1; \
	fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	bash .ci/java-env $(BIN)/python > $(JAVA_ENV)
	@touch $@

test: $(STAMP)
	@$(RUN) $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline preprocessing jobs tests bench notebooks
	$(BIN)/ruff format --check pipeline preprocessing jobs tests bench notebooks
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# Regenerate the README's config reference from the config dataclasses.
docs: $(STAMP)
	$(BIN)/python -m jobs.configref --write README.md
	$(BIN)/python -m jobs.reasonsref --write README.md
	$(BIN)/python -m jobs.treeref --write README.md

# Rebuild tests/compat/fixtures with the code of earlier releases (git worktrees under /tmp).
compat-fixtures: $(STAMP)
	@$(RUN) $(BIN)/python tests/compat/build_fixtures.py $(RELEASES)

demo: $(STAMP)
	@$(RUN) $(BIN)/spark-train demo --config jobs/configs/demo.yaml

bench: $(STAMP)
	@$(RUN) for b in bench/etl.py bench/reader.py bench/launch.py bench/epoch.py bench/modes.py bench/tfrecord.py; do \
	  [ -f $$b ] && $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) out data bench/_work .pytest_cache .mypy_cache .ruff_cache
