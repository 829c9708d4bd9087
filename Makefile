# These commands set everything up on a fresh machine with Python 3.11:
#   make report   the main job (benchmark report; a CPU run where there is no GPU)
#   make test     the test suite (Triton kernels through the interpreter on CPU)
#   make lint     ruff (rules in pyproject.toml; installs the `dev` extra on first use)
# TORCH picks the torch build for the virtual environment: the default is the CPU
# build; on a GPU machine use `make test TORCH=torch` (a CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.lint-installed

# `make report REPORT_ARGS=` runs the default suite of the machine (resnet50 on a GPU).
REPORT_ARGS ?= --suite quick

.PHONY: report test lint
report: $(STAMP)
	$(PY) -m sasa_triton.report $(REPORT_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check .

$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@
