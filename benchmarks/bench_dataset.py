"""Benchmark: dataset throughput of `knowmri diagnose --dataset` in one process vs two data-parallel processes.

The same command (`--dataset known_1000 --samples N --methods <light methods> --out DIR`) runs as one
process and under `accelerate launch --multi_gpu --num_processes 2` (two CPU processes on a machine
without GPUs, gloo), each process with `--threads` torch threads (1: two processes on two cores).
Throughput is samples per minute of the sample loop (`compute_seconds` in the report's provenance:
from the first sample to the last file, without interpreter start and model loading), and of the
whole command (wall clock, start-up included). The two reports must be identical apart from timings
(every result, the per-sample table, the consensus). Goal: two processes >= 1.7x one process.

The commands alternate (one, two; two, one; ...) over `--repeats` rounds; medians are reported.

    python benchmarks/bench_dataset.py [--quick] [--samples 16] [--methods logit_lens,attention_weights]
    python benchmarks/bench_dataset.py --skip-smollm2      # the tiny test model (seconds; shows the plumbing only)

Writes benchmarks/results/dataset.json.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as H

GOAL = 1.7
LIGHT = "logit_lens,attention_weights,integrated_gradients"


def model_spec(args: Any, scratch: Path) -> str:
    """What `--model` the commands load: the SmolLM2 preset, or a saved folder (tiny or `--shape` random model)."""
    if args.skip_smollm2 or args.shape:
        from knowmri.testing import tiny_model

        model = H.load_smollm2(args) if args.shape else tiny_model("llama")
        folder = scratch / "model"
        model.hf_model.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
        return str(folder)
    return "smollm2-135m"


def command(args: Any, model: str, out: Path, processes: int) -> list[str]:
    cli = ["-m", "knowmri", "diagnose", "--model", model, "--dataset", "known_1000", "--samples", str(args.samples),
           "--methods", args.methods, "--out", str(out), "--device", args.device, "--dtype", args.dtype, "--json"]
    if processes == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *cli]


def one_run(args: Any, model: str, scratch: Path, processes: int, round_: int) -> dict[str, Any]:
    out = scratch / f"p{processes}-r{round_}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(H.ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    start = time.perf_counter()
    done = subprocess.run(command(args, model, out, processes), env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    compute = report["provenance"]["compute_seconds"]
    print(f"  {processes} process(es): {compute:.1f} s sample loop ({60 * args.samples / compute:.1f} samples/min), "
          f"{wall:.1f} s wall", flush=True)
    return {"compute_s": compute, "wall_s": wall, "world_size": report["provenance"]["world_size"],
            "report": comparable(report)}


def comparable(data: dict[str, Any]) -> dict[str, Any]:
    """A report without its timings and provenance: what must be identical."""
    for result in data["results"].values():
        result.pop("seconds", None)
    for row in data["samples"]:
        row.pop("seconds", None)
    return {k: data[k] for k in ("model", "sample", "results", "consensus", "samples", "n_samples")}


def main() -> None:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=None, help="records of known_1000 (default 24, --quick 8)")
    p.add_argument("--methods", default=LIGHT, help=f"methods run on each sample (default {LIGHT})")
    p.set_defaults(threads=1, repeats=2)
    args = p.parse_args()
    H.setup(args)
    args.samples = args.samples or (8 if args.quick else 24)
    scratch = Path(tempfile.mkdtemp(prefix="knowmri-bench-dataset-"))
    try:
        model = model_spec(args, scratch)
        print(f"{args.samples} samples of known_1000, methods {args.methods}, {args.threads} thread(s) per process; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for r in range(max(1, args.repeats)):
            for processes in ((1, 2) if r % 2 == 0 else (2, 1)):  # alternated: a load spike hits both
                runs[processes].append(one_run(args, model, scratch, processes, r))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    reference = runs[1][0]["report"]
    equal = all(run["report"] == reference for rs in runs.values() for run in rs)
    med = {n: {k: statistics.median(run[k] for run in rs) for k in ("compute_s", "wall_s")} for n, rs in runs.items()}
    speedup = med[1]["compute_s"] / med[2]["compute_s"]
    wall_speedup = med[1]["wall_s"] / med[2]["wall_s"]
    rate = {n: 60 * args.samples / m["compute_s"] for n, m in med.items()}
    name = "smollm2-135m" if model == "smollm2-135m" else (f"random {args.shape}" if args.shape else "tiny llama")
    detail = (f"{args.samples} samples x ({args.methods}) on {name}; {rate[1]:.1f} vs {rate[2]:.1f} samples/min in the "
              f"sample loop (median of {args.repeats}); whole command {med[1]['wall_s']:.1f} s vs {med[2]['wall_s']:.1f} s "
              f"({wall_speedup:.2f}x, start-up and model loading included); reports identical: {equal}; "
              f"goal {GOAL}x: {'met' if speedup >= GOAL else 'missed'}")
    rows = [H.row("diagnose --dataset, 2 processes", "the same command in 1 process", med[2]["compute_s"],
                  med[1]["compute_s"], equal, detail, kind="compare", samples_per_min=rate,
                  wall_s={str(n): m["wall_s"] for n, m in med.items()})]
    for r in runs.values():
        for run in r:
            run.pop("report")
    H.print_rows(rows)
    path = H.write_result("dataset", rows, model=name, args=args, runs={str(n): rs for n, rs in runs.items()},
                          goal_ratio=GOAL, speedup=speedup, wall_speedup=wall_speedup)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
