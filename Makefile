# Two entry points on a fresh machine: `make demo` (the main job on CPU) and `make test` (the test suite).
# Python 3.11 or 3.12 (pyproject's requires-python): python3 when it is one, else python3.12, else python3.11 (a
# machine whose python3 is 3.13 still works); PYTHON=/path/to/python3.12 chooses.
SUPPORTED := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))
ifndef PYTHON
PYTHON := $(firstword $(foreach p,python3 python3.12 python3.11,$(shell $(p) -c '$(SUPPORTED)' >/dev/null 2>&1 && echo $(p))))
endif
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-slow repo bench sweep clean tools

# Refused in one line before anything is made: no supported Python. A venv left by an earlier try with another
# Python (or without pip: python3-venv missing) is made again, not patched (venv keeps its old python link).
$(STAMP): pyproject.toml
	@$(or $(PYTHON),false) -c '$(SUPPORTED)' >/dev/null 2>&1 || { echo "make: needs Python 3.11 or 3.12 and \
	$(if $(PYTHON),PYTHON=$(PYTHON) is not one,none of python3/python3.12/python3.11 on PATH is one); install one or \
	name it: make $(or $(MAKECMDGOALS),demo) PYTHON=/path/to/python3.12" >&2; exit 1; }
	@if [ -e $(VENV) ] && ! { $(PY) -c '$(SUPPORTED)' && $(PY) -m pip --version; } >/dev/null 2>&1; then \
	if [ "$(VENV)" = .venv ] && [ -f .venv/pyvenv.cfg ]; then \
	echo "make: .venv was made by another Python or without pip: making it again"; rm -rf .venv; \
	else echo "make: $(VENV) has no Python 3.11/3.12 with pip; give VENV= a new folder (an environment of yours \
	is never removed)" >&2; exit 1; fi; fi
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
