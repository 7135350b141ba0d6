"""Benchmark: dataset throughput of `knowmri diagnose --dataset` in one process vs two data-parallel processes.

The same command (`--dataset known_1000 --samples N --methods <light methods> --out DIR`) runs as one
process and under `accelerate launch --multi_gpu --num_processes 2` (two CPU processes on a machine
without GPUs, gloo), each process with `--threads` torch threads (1: two processes on two cores).
Throughput is samples per minute of the sample loop (`compute_seconds` in the report's provenance:
from the first sample to the last file, without interpreter start and model loading), and of the
whole command (wall clock, start-up included). The two reports must be identical apart from timings
(every result, the per-sample table, the consensus). Goal: two processes >= 1.7x one process.

The commands alternate (one, two; two, one; ...) over `--repeats` rounds; medians are reported.

With `--batch B`, it measures batching across samples instead, in one process: the same dataset run
(`diagnose_dataset`, the model loaded once) one record at a time and `B` records at a time (the
methods' batched forms: the light methods' shared clean pass, integrated gradients' rows), alternated
over `--repeats` rounds; the sample loops are timed and every record's findings must agree (to float
rounding: 1e-4 relative).

    python benchmarks/bench_dataset.py [--quick] [--samples 16] [--methods logit_lens,attention_weights]
    python benchmarks/bench_dataset.py --skip-smollm2      # the tiny test model (seconds; shows the plumbing only)
    python benchmarks/bench_dataset.py --batch 8 --samples 32 --repeats 3

Writes benchmarks/results/dataset.json (with --batch: dataset_batching.json).
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


def differences(a: Any, b: Any, where: str = "", rtol: float = 1e-4, atol: float = 1e-4) -> Any:
    """(where, a, b) for each value of two JSON trees that differs beyond float rounding (`atol` + `rtol`)."""
    if isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b):
        for key in a:
            yield from differences(a[key], b[key], f"{where}/{key}", rtol, atol)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, f"{where}[{i}]", rtol, atol)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        if abs(a - b) > atol + rtol * abs(b):
            yield (where, a, b)
    elif a != b:
        yield (where, a, b)


def unordered(data: Any) -> Any:
    """`data` with every list of heads or neurons sorted by place, so two of equal score may come in either order."""
    if isinstance(data, dict):
        return {k: unordered(v) for k, v in data.items()}
    if isinstance(data, list):
        items = [unordered(v) for v in data]
        for keys in (("layer", "head"), ("layer", "unit")):
            if items and all(isinstance(v, dict) and all(k in v for k in keys) for v in items):
                return sorted(items, key=lambda v: tuple(v[k] for k in keys))
        return items
    return data


def batching(args: Any) -> None:
    """One record at a time vs `args.batch` at a time, in one process, alternated; medians of the sample loop."""
    import knowmri as km
    from knowmri.diagnosis import diagnose_dataset

    model = H.load_smollm2(args) if not args.skip_smollm2 else __import__("knowmri.testing").testing.tiny_model("llama")
    name = "tiny llama" if args.skip_smollm2 else ("smollm2-135m" if not args.shape else f"random {args.shape}")
    dataset = km.load_dataset("known_1000")
    methods = [m for m in args.methods.split(",") if m]
    print(f"{args.samples} samples of known_1000, methods {args.methods}, batch {args.batch} vs 1, {args.threads} "
          f"thread(s); load average {os.getloadavg()[0]:.1f}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="knowmri-bench-batching-"))
    loads: dict[int, list[dict[str, Any]]] = {}
    try:
        def run(batch: int) -> dict[str, Any]:
            out = scratch / f"b{batch}-{len(loads.get(batch, []))}"
            report = diagnose_dataset(dataset, model, methods=methods, samples=args.samples, progress=False, out=out,
                                      batch_size=batch)
            files = {f.name: json.loads(f.read_text()) for f in sorted((out / "samples").glob("*.json"))}
            loads.setdefault(batch, []).append(files)
            shutil.rmtree(out, ignore_errors=True)
            return report.meta["provenance"]["compute_seconds"]

        times: dict[int, list[float]] = {1: [], args.batch: []}
        run(1)  # warm-up (kernels, caches)
        for r in range(max(1, args.repeats)):
            for batch in ((1, args.batch) if r % 2 == 0 else (args.batch, 1)):
                times[batch].append(run(batch))
                print(f"  batch {batch}: {times[batch][-1]:.1f} s sample loop "
                      f"({60 * args.samples / times[batch][-1]:.1f} samples/min)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    reference = loads[1][0]
    found = [(f"{f} {where}", x, y) for runs in loads.values() for files in runs for f in sorted(files)
             for where, x, y in differences(unordered({m: r["findings"] for m, r in files[f]["results"].items()}),
                                            unordered({m: r["findings"] for m, r in reference[f]["results"].items()}))]
    ties = [d for d in found if isinstance(d[1], int) and isinstance(d[2], int) and abs(d[1] - d[2]) == 1]
    agree = len(found) == len(ties)
    med = {b: statistics.median(t) for b, t in times.items()}
    speedup = med[1] / med[args.batch]
    per_method = {}
    for b in (1, args.batch):
        last = loads[b][-1]
        per_method[str(b)] = {m: round(sum(f["results"][m]["seconds"] for f in last.values()), 3) for m in methods}
    detail = (f"{args.samples} samples x ({args.methods}) on {name}, {args.threads} thread(s): "
              f"{60 * args.samples / med[1]:.1f} samples/min one at a time, {60 * args.samples / med[args.batch]:.1f} "
              f"{args.batch} at a time ({speedup:.2f}x, median of {len(times[1])}); findings agree to float rounding: "
              f"{agree} ({len(found)} values differ beyond 1e-4, {len(ties)} of them a rank moved by one at a "
              f"near-tie of two logits); seconds per method (last round) {per_method}")
    rows = [H.row(f"diagnose_dataset, batch_size {args.batch}", "batch_size 1 (one record at a time)", med[args.batch],
                  med[1], agree, detail, kind="compare", times_s={str(b): t for b, t in times.items()},
                  method_seconds=per_method, differences=[list(d) for d in found[:20]], near_ties=len(ties))]
    H.print_rows(rows)
    path = H.write_result("dataset_batching", rows, model=name, args=args, speedup=speedup)
    print(f"wrote {path}")


def main() -> None:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=None, help="records of known_1000 (default 24, --quick 8)")
    p.add_argument("--methods", default=LIGHT, help=f"methods run on each sample (default {LIGHT})")
    p.add_argument("--batch", type=int, default=None, help="measure batching across samples (B at a time vs 1) instead")
    p.set_defaults(threads=1, repeats=2)
    args = p.parse_args()
    H.setup(args)
    args.samples = args.samples or (8 if args.quick else 24)
    if args.batch:
        batching(args)
        return
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
