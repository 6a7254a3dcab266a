# Quick start:   make eval   (sets up .venv, runs the main evaluation)
#                make test   (sets up .venv, runs the test suite)
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Offline assets (tests and the offline example); the library itself never reads this path.
ASSETS ?= ../shared/assets
export LMLOSS_ASSETS ?= $(abspath $(ASSETS))
export TIKTOKEN_CACHE_DIR ?= $(abspath $(ASSETS))/tokenizers/tiktoken_cache

# Main job. Online the defaults are the hub model and corpus; override for offline use, e.g.
#   make eval MODEL=../shared/assets/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf \
#             LMLOSS_DATA_DIR=../shared/assets/corpora
MODEL   ?= $(or $(LMLOSS_MODEL),gpt2)
DATASET ?= wikitext
PRESET  ?= lm-eval
EVAL_ARGS ?=

.PHONY: setup eval test test-all bench clean

setup: $(VENV)/.installed

# torch==2.13.0 first: on a machine with the CPU wheel on disk (this project's CI) pip takes it in
# seconds; elsewhere PyPI's build for the platform (CUDA on Linux x86-64) is installed.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

eval: setup
	$(BIN)/python scripts/eval.py --model "$(MODEL)" --dataset "$(DATASET)" --preset "$(PRESET)" $(EVAL_ARGS)

test: setup
	$(BIN)/python -m pytest -q -m "not cuda" tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not cuda and not slow" tests

bench: setup
	$(BIN)/python scripts/bench_token_nll.py

clean:
	rm -rf $(VENV) .pytest_cache
