# Two entry points on a fresh machine: `make demo` (the main job on CPU) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-slow repo bench sweep clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m edet_deploy demo --out build/demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --timeout=900

# The unit layer alone: no real server started, no large variant (a few minutes).
test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not server" --timeout=900

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --timeout=3600

# The committed model_repository/ holds configs and model.py shims; this adds the ONNX graph it serves. fp32 by
# name: triton-repo's default is bf16 on CPUs that have it, and the committed configs must not depend on the CPU.
repo: $(STAMP)
	$(PY) -m edet_deploy triton-repo --model d0 --weights edet_deploy/assets/shapes_d0.safetensors --precision fp32 --out model_repository

bench: $(STAMP)
	$(PY) -m edet_deploy bench --models d0 --quick --out build/bench

sweep: $(STAMP)
	$(PY) benchmarks/sweep.py

clean:
	rm -rf build
