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

.PHONY: setup build test test-rust test-python test-llamacpp soak fuzz bench bench-smollm2 gpu-bin demo-teacher clean sweep

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

# Every test, those against a real llama.cpp too (llama-server for served teachers and judges
# and exported students, llama-quantize for the K-quants, llama-cpp-python's server for
# teacher-forced scoring): its C++ tools and llama-cpp-python's wheel are built once from the
# llama-cpp-python sdist into ~/.cache/distillery (about 10 and 5 minutes on 2 cores the first
# time, nothing after).
test-python:
	$(PYTHON) scripts/llamacpp.py build
	$(PYTHON) scripts/llamacpp.py python-server
	$(PYTHON) -m pytest tests -q

# Only the tests against llama.cpp.
test-llamacpp: build
	$(PYTHON) scripts/llamacpp.py build
	$(PYTHON) scripts/llamacpp.py python-server
	$(PYTHON) -m pytest tests -q -m llamacpp

# The long reliability runs: 20 SIGTERM-and-resume runs of kd-distill and three kill -9
# runs per long stage (the quick variants are part of `make test`).
soak: build
	DISTILLERY_SOAK=1 $(PYTHON) -m pytest tests/test_reliability.py -q -s

# The fuzz campaign over every input format (docs/RELIABILITY.md records its counts).
FUZZ_CASES ?= 20000
fuzz: build
	DISTILLERY_FUZZ_CASES=$(FUZZ_CASES) cargo test --release -p distillery --test fuzz -- --nocapture --test-threads 1

# The size-versus-quality sweep (pipelines/sweep.mk): its own pipeline file, the same stages.
sweep:
	$(MAKE) --no-print-directory pipeline PIPELINE=pipelines/sweep.mk

bench: build
	$(PYTHON) scripts/bench.py --out docs/BENCHMARKS.md
	$(PYTHON) scripts/bench_on_policy.py --out docs/BENCHMARKS.md

# The real model on the CPU: SmolLM2-135M-Instruct and its pruned student, fp32 and bf16,
# against the best PyTorch variant, and generation against llama.cpp (about 15 minutes).
bench-smollm2: build
	$(PYTHON) scripts/llamacpp.py build
	$(PYTHON) scripts/bench_smollm2.py --out docs/BENCHMARKS.md

# What a GPU machine needs (../shared/GPU.md): the stage binaries and the mixed-precision
# test binary in .gpu/bin (ignored by git), run there by scripts/gpu_check.py.
gpu-bin: build
	mkdir -p .gpu/bin
	cp $(BIN)/kd-* .gpu/bin/ && rm -f .gpu/bin/*.d
	cp "$$(cargo test --release -p distillery --test mixed_precision --no-run --message-format=json 2>/dev/null | \
		$(PYTHON) -c "import json,sys; print([m['executable'] for m in map(json.loads, sys.stdin) if m.get('executable')][-1])")" .gpu/bin/mixed_precision

include $(PIPELINE)
include pipelines/demo-teacher.mk

clean:
	rm -rf runs
