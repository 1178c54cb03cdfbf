# The two set-up commands of the README:
#   make demo   install everything, then run the main job (index real emoji images, search them)
#   make test   install test needs, then run ruff and the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
FAISS ?= cpu# cpu | gpu (faiss-gpu wheel; needs CUDA 12)
BIN := $(VENV)/bin

.PHONY: install install-test demo test lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-$(FAISS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[$(FAISS)]"
	touch $@

$(VENV)/.installed-test-$(FAISS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[$(FAISS),test]"
	touch $@ $(VENV)/.installed-$(FAISS)

install: $(VENV)/.installed-$(FAISS)

install-test: $(VENV)/.installed-test-$(FAISS)

demo: install
	$(BIN)/stair-search demo

lint: install-test
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q --durations=15

bench: install
	$(BIN)/python benchmarks/encoder_throughput.py
	$(BIN)/python benchmarks/search_latency.py
