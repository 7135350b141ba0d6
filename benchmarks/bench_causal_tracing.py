"""Benchmark: knowmri's causal tracing vs the straightforward ROME loop, on the same grid.

The baseline is a faithful reimplementation of ROME's `trace_with_patch` loop (Meng et al.
2022, `experiments/causal_trace.py`) over knowmri's hooks, `knowmri.testing.rome_reference`:
one forward per (token, layer) cell, with a clean row 0 and `samples` noised rows, the clean
state copied into the noised rows at that cell, full logits, P(answer) averaged over the noised
rows. Both use the same noise.
The two are alternated in one process; medians and the speed-up are reported, and the grids
are checked to be equal. "knowmri grid" times the engine that computes the grid (what the loop
computes); "whole method" adds preparation, summary, tables and Plotly figures. Writes benchmarks/results/causal_tracing.json.

    python benchmarks/bench_causal_tracing.py [--repeats 2] [--samples 3] [--threads 1] [--skip-smollm2]

On SmolLM2 the settings are reduced (hidden states only, 3 noise samples) to keep the ROME
loop, 300 full forwards per repeat, to a minute or two on a small CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from knowmri.methods.base import RunContext, get_method  # noqa: E402
from knowmri.methods.tracing_engine import trace  # noqa: E402
from knowmri.sample import Sample  # noqa: E402
from knowmri.testing.rome_reference import rome_inputs, rome_trace  # noqa: E402

EIFFEL = Sample(prompt="The Eiffel Tower is located in the city of", ground_truth=" Paris", triple_subject="Eiffel Tower")


def bench(name: str, model: Any, kinds: list[str], samples: int, window: int, repeats: int,
          method_too: bool = True) -> dict[str, Any]:
    """Median seconds of knowmri's grid computation and of the ROME loop, alternated (and of the whole method)."""
    method = get_method("causal_tracing")
    params = method.Params.from_dict({"samples": samples, "kinds": kinds, "window": window})
    inputs = rome_inputs(model, EIFFEL, samples, params.noise, params.seed)
    args = (inputs["input_ids"], inputs["position"], inputs["answer"], inputs["subject"], inputs["noise"], kinds,
            window, params.batch_size)

    def engine() -> Any:
        with torch.inference_mode():
            return trace(model, *args)

    ours, theirs, whole = [], [], []
    if method_too:  # warm-up (imports, allocator) and the whole method's time, figures included
        result = method.run(model, EIFFEL, params, RunContext())
        rome_trace(model, **inputs, kinds=kinds, window=window)
    for _ in range(repeats):
        start = time.perf_counter()
        got = engine()
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        low, grids = rome_trace(model, **inputs, kinds=kinds, window=window)
        theirs.append(time.perf_counter() - start)
        if method_too:
            start = time.perf_counter()
            result = method.run(model, EIFFEL, params, RunContext())
            whole.append(time.perf_counter() - start)
    diff = max(float((got.grids[k] - grids[k]).abs().max()) for k in kinds)
    diff = max(diff, abs(got.low - low))
    equal = all(torch.allclose(got.grids[k], grids[k], atol=1e-4, rtol=1e-3) for k in kinds)
    if method_too:
        equal = equal and all(torch.equal(torch.tensor(result.findings[k]), got.grids[k]) for k in kinds)
    row = {"model": name, "kinds": kinds, "samples": samples, "window": window, "tokens": int(inputs["input_ids"].shape[1]),
           "layers": model.n_layers, "repeats": repeats, "knowmri_s": statistics.median(ours),
           "rome_loop_s": statistics.median(theirs), "knowmri_method_s": statistics.median(whole) if whole else None,
           "knowmri_all_s": ours, "rome_loop_all_s": theirs, "max_abs_diff": diff, "allclose": equal,
           "engine": got.engine}
    row["speedup"] = row["rome_loop_s"] / row["knowmri_s"]
    print(f"  {name}: knowmri {row['knowmri_s']:.2f} s, ROME loop {row['rome_loop_s']:.2f} s, "
          f"x{row['speedup']:.1f}, max |diff| {diff:.1e}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="repeats on SmolLM2 (at least 5 on the tiny models)")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default; on a small shared CPU they distort timings)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "causal_tracing.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from knowmri.testing import tiny_model

    tiny_repeats = max(5, args.repeats)
    rows = [bench("tiny-llama (3 layers)", tiny_model("llama"), ["hidden", "mlp", "attn"], args.samples, 2, tiny_repeats),
            bench("tiny-gpt2 (3 layers)", tiny_model("gpt2"), ["hidden", "mlp", "attn"], args.samples, 2, tiny_repeats)]
    if not args.skip_smollm2:
        import knowmri as km

        rows.append(bench("smollm2-135m (30 layers)", km.load_model("smollm2-135m"), ["hidden"], args.samples, 10,
                          args.repeats, method_too=False))
    print("\n| model | kinds | samples | tokens x layers | knowmri grid (s) | ROME loop (s) | speed-up "
          "| whole method (s) | grids equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        method_s = "-" if r["knowmri_method_s"] is None else f"{r['knowmri_method_s']:.2f}"
        print(f"| {r['model']} | {','.join(r['kinds'])} | {r['samples']} | {r['tokens']} x {r['layers']} | "
              f"{r['knowmri_s']:.2f} | {r['rome_loop_s']:.2f} | {r['speedup']:.1f}x | {method_s} | "
              f"{'yes' if r['allclose'] else 'NO'} ({r['max_abs_diff']:.1e}) |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"benchmark": "causal_tracing", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": "cpu", "rows": rows}
    out.write_text(json.dumps(info, indent=2))
    print(f"\nwrote {out}")
    if not all(r["allclose"] for r in rows):
        raise SystemExit("the optimized grids differ from the ROME loop")


if __name__ == "__main__":
    main()
