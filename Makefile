# Two entry points on a fresh machine: `make demo` (the main job on CPU) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-slow repo bench sweep clean tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,lint]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m edet_deploy demo --out build/demo

test: $(STAMP) tools
	$(PY) -m pytest -q -m "not slow" --timeout=900

# The unit layer alone: no real server started, no large variant (a few minutes).
test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not server" --timeout=900

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --timeout=3600

# Linters whose pins clash with ours, each in a venv of its own (tests/test_deploy.py finds them here, or
# through EDET_CHECKOV / EDET_MODEL_ANALYZER; without them those tests skip and say why).
TOOLS := build/tools
tools: $(TOOLS)/checkov/.installed $(TOOLS)/model-analyzer/.installed

$(TOOLS)/checkov/.installed:
	$(PYTHON) -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/python -m pip install -q checkov==3.3.30
	touch $@

$(TOOLS)/model-analyzer/.installed:
	$(PYTHON) -m venv $(TOOLS)/model-analyzer
	$(TOOLS)/model-analyzer/bin/python -m pip install -q triton-model-analyzer==1.58.0
	touch $@

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
