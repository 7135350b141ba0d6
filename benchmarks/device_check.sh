#!/usr/bin/env bash
# The GPU check, prepared to run as one command on a lent GPU machine (its image has torch, transformers
# and accelerate, but not the GGUF file, gguf, captum or plotly). Results land in $OUT (or build/device-check).
#
# Before the call, on the project's machine (wheels for the device's Python 3.12):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform any -d .whl gguf captum plotly narwhals
# Then run it with `.whl` carried:  bash benchmarks/device_check.sh
#
# What it measures (absolute GPU numbers; SmolLM2's weights cannot travel, so its shape with random weights,
# which keeps every timing and equality check and makes the findings meaningless):
#   1. the method x family matrix and the half-precision tests, on the CPU there (a sanity check of the image);
#   2. the benches in bfloat16 on the GPU: causal tracing vs ROME's loop, KN vs the per-layer loop, IG vs
#      Captum, PatchScopes vs its loop, the whole diagnose, the floor and estimate() vs measured memory;
#   3. the whole diagnose on a 7B-class shape (llama-7b, bfloat16);
#   4. every method with the blocks split over the GPU and the CPU (Accelerate dispatch) vs one device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/device-check}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export KNOWMRI_HOME="${KNOWMRI_HOME:-/tmp/knowmri-home}"
(nvidia-smi; python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)") \
  > "$OUT/machine.txt" 2>&1
step() { echo "=== $1"; shift; timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | tail -n 40; echo "rc=${PIPESTATUS[0]}"; }
{
  step "tests (CPU there)" python3 -m pytest -q -x -p no:cacheprovider tests/methods/test_half_precision.py tests/methods/test_all_methods.py
  for bench in causal_tracing knowledge_neurons integrated_gradients patchscopes diagnose floor estimate; do
    step "bench $bench (cuda, bfloat16, smollm2 shape)" python3 "benchmarks/bench_$bench.py" --quick --device cuda \
      --dtype bfloat16 --shape smollm2-135m --threads 8 --out "$OUT/$bench.json"
  done
  step "diagnose, llama-7b shape" python3 benchmarks/bench_diagnose.py --quick --device cuda --dtype bfloat16 \
    --shape llama-7b --threads 8 --out "$OUT/diagnose-7b.json"
  step "split over cuda:0 and cpu" python3 benchmarks/check_sharded.py --devices cuda:0,cpu --dtype bfloat16 \
    --threads 8 --out "$OUT/sharded.json"
} | tee "$OUT/log.txt"
