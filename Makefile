# Distillery. The two commands a new user needs:
#   make pipeline   # the whole distillation pipeline on the embedded default
#   make sweep      # students of three sizes x strategies x seeds: size-versus-quality curves
#   make test       # every test
# Both set up what they need first: a project-local venv with torch (libtorch for tch)
# and transformers, then release builds of the stage binaries.
SHELL := /bin/bash
VENV ?= .venv
VENV_ABS := $(abspath $(VENV))
PYTHON := $(VENV_ABS)/bin/python
# tch finds libtorch inside the venv's torch wheel; nothing is downloaded at build time.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV_ABS)/bin:$(PATH)
BIN := target/release
PIPELINE ?= pipelines/default.mk

.PHONY: setup build test test-rust test-python bench demo-teacher clean sweep

setup: build

$(VENV)/.ready: scripts/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --progress-bar off -r scripts/requirements.txt
	touch $@

build: $(VENV)/.ready
	cargo build --release

test: build
	$(MAKE) --no-print-directory test-rust test-python

test-rust:
	cargo test --release --workspace

test-python:
	$(PYTHON) -m pytest tests -q

# The size-versus-quality sweep (pipelines/sweep.mk): its own pipeline file, the same stages.
sweep:
	$(MAKE) --no-print-directory pipeline PIPELINE=pipelines/sweep.mk

bench: build
	$(PYTHON) scripts/bench.py --out docs/BENCHMARKS.md

include $(PIPELINE)
include pipelines/demo-teacher.mk

clean:
	rm -rf runs
