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
DEMO_ARGS ?=
# The offset vs direct table in the tiny world: make compare COMPARE_ARGS="--methods NPO GD"
COMPARE_ARGS ?=

# Mutation testing (mutmut, configured in setup.cfg [mutmut]): losses/, modules/, metrics/ and evaluation/
# against the fast tests; MUTATE=lightning_unlearn/losses/ (a folder or a .py file) tests one part only.
MUTATE ?=
MUTANT_WORKERS ?= 1
MUTANT_FILTER := $(if $(MUTATE),"$(subst /,.,$(patsubst %/,%,$(patsubst %.py,%,$(MUTATE)))).*")

.PHONY: install test test-fast demo compare mutants clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -m "slow or not slow"

test-fast: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest

demo: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m lightning_unlearn.demo --method $(METHOD) $(DEMO_ARGS)

compare: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m lightning_unlearn.compare --world tiny $(COMPARE_ARGS)

# Each mutant runs the fast tests that reach the mutated function, on one thread per worker; results are
# cached in mutants/ (a second run only tests what changed). Survivors: $(BIN)/mutmut show NAME.
mutants: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTANT_WORKERS) $(MUTANT_FILTER)
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) lightning_logs runs mutants
