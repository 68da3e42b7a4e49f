# Two commands set up everything on a fresh machine: `make demo` and `make test`.
# A virtual environment in .venv gets torch (2.13.0, CPU build, unless the environment already has a torch),
# the build and test tools, and visionmoe built against that torch (--no-build-isolation, so no other torch is
# pulled) with its runtime dependencies.
# On a machine whose system Python already has a CUDA torch: make test VENV_OPTS=--system-site-packages

PYTHON ?= python3
VENV ?= .venv
VENV_OPTS ?=
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
SOURCES := $(shell find csrc python -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.py' \)) \
           CMakeLists.txt pyproject.toml

.PHONY: install demo test fuzz bench cuda-compile lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV_OPTS) $(VENV)

$(VENV)/.deps: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -c "import numpy, pytest, scikit_build_core, pybind11, ninja, expecttest, nbclient, nbformat, ipykernel" \
	  2>/dev/null || $(PY) -m pip install numpy pytest expecttest "scikit-build-core>=0.10" "pybind11>=2.12" ninja \
	  nbclient nbformat ipykernel
	touch $@

# Runtime dependencies come from pyproject.toml; torch is already there, so pip keeps it.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation .
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py

# -p no:cacheprovider keeps a read-only checkout clean; pytest exits non-zero when it collects no tests.
test: install
	$(PY) -m pytest -p no:cacheprovider -ra $(PYTEST_ARGS) tests

# The long fuzz run: thousands of seeded cases over every operator family, in worker processes so that a crash is
# a reported outcome; the summary (cases, outcomes, every failure with its replayable input) goes to the JSON file.
FUZZ_CASES ?= 100000
FUZZ_SEED ?= 1
fuzz: install
	$(PY) tests/fuzz/fuzz_runner.py --cases $(FUZZ_CASES) --seed $(FUZZ_SEED) --output benchmarks/results/fuzz_cpu.json

bench: install
	$(PY) benchmarks/bench_dispatch.py

# Lint: ruff (rules and formatting, configured in pyproject.toml) for Python and notebooks, clang-format
# (.clang-format) for C++ and CUDA. Pinned so that every machine agrees on the format; `make format` applies both.
LINT_TOOLS := ruff==0.17.6 clang-format==23.1.5
CXX_SOURCES = $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \))

$(VENV)/.lint-tools: $(PY)
	$(PY) -m pip install $(LINT_TOOLS)
	touch $@

lint: $(VENV)/.lint-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(VENV)/.lint-tools
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

cuda-compile: $(VENV)/.deps
	.ci/compile_cuda.sh $(PY)

clean:
	rm -rf build $(VENV)
