# The two set-up commands of the README:
#   make demo   install everything, then run the main job (index real emoji images, search them)
#   make test   install test needs, then run ruff and the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
FAISS ?= cpu# cpu | gpu (faiss-gpu wheel; needs CUDA 12)
BIN := $(VENV)/bin

.PHONY: install install-test wordnet system-test-deps demo test lint bench

# pip's Linux torch wheels bring their CUDA libraries: the venv takes about 7.5 GB.
NEEDED_GB := 8
$(BIN)/python:
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); if [ "$$free" -lt $(NEEDED_GB) ]; then \
	  echo "error: $(VENV) needs about $(NEEDED_GB) GB of free disk and $$(pwd) has $$free GB: free some space and rerun make" >&2; \
	  exit 1; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-$(FAISS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-cache-dir -e ".[$(FAISS)]"
	touch $@

$(VENV)/.installed-test-$(FAISS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-cache-dir -e ".[$(FAISS),test]"
	touch $@ $(VENV)/.installed-$(FAISS)

install: $(VENV)/.installed-$(FAISS)

install-test: $(VENV)/.installed-test-$(FAISS)

demo: install wordnet
	$(BIN)/stair-search demo

# S^3's synonyms (--rerank s3, classify) read Debian's WordNet files; without them S^3 refuses with this fix.
wordnet:
	@if [ ! -f /usr/share/wordnet/data.noun ] && [ -z "$$STAIR_WORDNET" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null; \
	  else echo "note: S^3 (--rerank s3) needs WordNet: sudo apt-get install wordnet-base (or set STAIR_WORDNET)"; fi; fi

# Debian packages the tests use: Chromium for the web page test, WordNet for S^3 synonyms.
SYSTEM_TEST_DEPS := chromium chromium-driver wordnet-base
system-test-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -d /usr/share/wordnet ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_TEST_DEPS) >/dev/null; \
	  else echo "note: install $(SYSTEM_TEST_DEPS) (Debian) for the browser and WordNet tests"; fi; fi

lint: install-test system-test-deps
	$(BIN)/ruff check .

# Two pytest workers (pytest-xdist; a file's tests stay in one worker, so its module fixtures are built once),
# then the Ray cluster tests alone: they check serving under load, and share the cores with no other test.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not cluster" --durations=15
	$(BIN)/python -m pytest -q -m cluster --durations=5

bench: install
	$(BIN)/python benchmarks/encoder_throughput.py
	$(BIN)/python benchmarks/search_latency.py
	test -f indexes/demo/manifest.json || $(BIN)/stair-search demo
	$(BIN)/python benchmarks/search_latency.py --like indexes/demo
	$(BIN)/python benchmarks/indexing_throughput.py --models stair-tiny stair-lite-4 --images 768
	$(BIN)/python benchmarks/lucene_build.py
	$(BIN)/python benchmarks/rerank_quality.py --model stair-lite-4
	$(BIN)/python benchmarks/load_test.py --seconds 15
	$(BIN)/python benchmarks/encode_threads.py
	$(BIN)/python benchmarks/store_reads.py
	$(BIN)/python benchmarks/query_weights.py
	$(BIN)/python benchmarks/router_latency.py
	$(BIN)/python benchmarks/emoji_eval.py --models stair-tiny stair-lite-4 stair-lite-5
	$(BIN)/python benchmarks/photo_queries.py --models stair-tiny stair-lite-4 stair-lite-5
