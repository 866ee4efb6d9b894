# Quick start (from a clean clone, nothing installed by hand):
#   make demo   -> sets up .venv and runs the main job
#   make test   -> sets up .venv and runs the test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: the local-disk CUDA 13 build (runs on CPU; lets timm/torchvision import and lets
# setup.py compile + link csrc/*.cu with nvcc). Never reach for a newer torch than this.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export CUDA_HOME ?= /usr/local/cuda
STAMP := $(VENV)/.vlmo_fast-installed

.PHONY: setup demo test test-fast bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel ninja pybind11
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install --no-build-isolation -e '.[dev]'
	$(PY) -c "import vlmo_fast; print(vlmo_fast.backend_report())"
	touch $@

demo: setup
	$(PY) -m vlmo_fast.demo

test: setup
	$(VENV)/bin/pytest -q -ra tests

bench: setup
	$(PY) benchmarks/bench_mome.py --quick

gpu-check: setup
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf build *.egg-info vlmo_fast/_C*.so
