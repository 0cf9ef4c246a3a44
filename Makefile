# sluice: `make run` serves the bundled models on 127.0.0.1 (HTTP 8000, gRPC 8001,
# metrics 8002); `make test` runs every test. Both set everything up on first use:
# the Python virtual environment with PyTorch, the exported model weights, the build.

SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
TORCH_LIB := $(VENV)/lib/python3.11/site-packages/torch/lib
TEST_WEIGHTS := $(CURDIR)/target/test-weights

# tch finds libtorch through the virtual environment's PyTorch.
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export SLUICE_TEST_WEIGHTS := $(TEST_WEIGHTS)

MODEL_WEIGHTS := models/mlp/1/model.pt models/cnn/1/model.pt

.PHONY: all setup venv models build run test test-rust test-python test-helm test-deploy lint bench clean help

all: build

help:
	@echo "make run    set up, build (release) and serve ./models on 127.0.0.1:8000/8001/8002"
	@echo "make test   set up, build and run every test (Rust, Python client, Helm chart)"
	@echo "make bench  run the benchmark scenarios in bench/scenarios against a local sluice"
	@echo "make lint   rustfmt and clippy"

setup: venv models

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing Python requirements into .venv (PyTorch is large: a few minutes on first run)"
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

models: $(MODEL_WEIGHTS) $(TEST_WEIGHTS)/.exported

$(MODEL_WEIGHTS) $(TEST_WEIGHTS)/.exported &: models/export.py $(VENV)/.installed
	$(PY) models/export.py --test-weights $(TEST_WEIGHTS)
	@touch $(TEST_WEIGHTS)/.exported

build: setup
	cargo build --release -p sluice

run: build
	./target/release/sluice --model-repository models

test: setup test-rust test-python test-helm test-deploy

test-rust: setup
	cargo test --workspace --no-fail-fast

test-python: setup
	cargo build -p sluice
	SLUICE_BIN=$(CURDIR)/target/debug/sluice $(PY) -m pytest -q server/tests/python

test-helm:
	bash helm/check-chart.sh

# The container image's library set: the binary runs with only the libraries it copies.
test-deploy: setup
	cargo build -p sluice
	bash deploy/test-runtime-libs.sh target/debug/sluice

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench: build
	bash bench/run-all.sh

clean:
	cargo clean
	rm -rf $(VENV) $(TEST_WEIGHTS) models/*/[0-9]*/model.pt models/.reference
