# calofm: two entry points, each sets up .venv on first use.
#   make demo   simulate -> pretrain -> adapt -> generate -> evaluate on the embedded default
#   make test   the whole test suite
PYTHON ?= python3
VENV   ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY  := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.calofm-installed

export HF_HUB_DISABLE_PROGRESS_BARS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint venv clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: a CPU build unless torch is already importable (override TORCH_SPEC for GPUs)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -x -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(VENV)/bin/ruff check calofm tests recipes benchmarks scripts

demo: $(STAMP)
	$(PY) scripts/demo.py

clean-demo:
	rm -rf demo_out
