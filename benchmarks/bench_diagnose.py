"""Benchmark: the whole `km.diagnose` of every method on the Eiffel fact, on SmolLM2 (goal: < 60 s on CPU).

Runs `knowmri.diagnose` with every eligible method at its default parameters (the SPEC's: causal
tracing with 10 noise samples, KN and IG with 20 steps, ...), as a user would, with a fresh $KNOWMRI_HOME (so SPINE trains instead of loading its cached weights: the cold,
first-run case) and `torch.set_num_threads(2)`. A second, warm run (SPINE cached) is timed
unless --quick. Reports each method's seconds, the consensus step and the total. Writes
benchmarks/results/diagnose.json.

    python benchmarks/bench_diagnose.py [--quick] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import os
import time
from typing import Any

import _harness as H

GOAL_S = 60.0


def one_run(model: Any, label: str, params: dict[str, dict] | None = None) -> dict[str, Any]:
    import knowmri as km

    seen: list[str] = []
    cpu: dict[str, float] = {}
    mark = [time.process_time()]

    def progress(method: str, fraction: float, message: str) -> None:
        if not seen or seen[-1] != method:
            seen.append(method)
            print(f"  [{time.perf_counter() - start:6.1f} s] {method} ...", flush=True)
        if fraction >= 1.0 and message == "done":  # diagnose reports "done" after each method (a method may too)
            now = time.process_time()
            cpu[method] = cpu.get(method, 0.0) + now - mark[0]
            mark[0] = now

    start, cpu0 = time.perf_counter(), time.process_time()
    report = km.diagnose(H.eiffel(), model, params=params, progress=progress)
    total, total_cpu = time.perf_counter() - start, time.process_time() - cpu0
    per = {name: {"seconds": r.seconds, "cpu_s": cpu.get(name), "status": r.status, "error": r.error}
           for name, r in report.results.items()}
    methods_s = sum(v["seconds"] for v in per.values())
    print(f"{label}: total {total:.1f} s, CPU {total_cpu:.1f} s (methods {methods_s:.1f} s, consensus and report "
          f"{total - methods_s:.1f} s)", flush=True)
    for name, v in sorted(per.items(), key=lambda kv: -kv[1]["seconds"]):
        c = f"{v['cpu_s']:7.2f}" if v["cpu_s"] is not None else "      –"
        print(f"  {name:22s} {v['seconds']:7.2f} s  CPU {c} s  {v['status']}"
              f"{'  ' + (v['error'] or '')[:120] if v['error'] else ''}", flush=True)
    return {"label": label, "total_s": total, "total_cpu_s": total_cpu, "methods_s": methods_s,
            "consensus_s": total - methods_s, "methods": per}


def main() -> None:
    p = H.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    H.setup(args)
    model = H.load_smollm2(args)
    os.environ["KNOWMRI_HOME"] = H.scratch_home()  # cold: SPINE trains
    params = None
    note = " at the defaults"
    runs = [one_run(model, "cold (fresh $KNOWMRI_HOME)" + note, params)]
    if not args.quick:
        runs.append(one_run(model, "warm (SPINE cached)" + note, params))
    cold = runs[0]
    rows = []
    for name, v in cold["methods"].items():
        warm = runs[-1]["methods"].get(name, {}).get("seconds") if len(runs) > 1 else None
        cpu = f"CPU {v['cpu_s']:.1f} s; " if v["cpu_s"] is not None else ""
        rows.append(H.row(f"diagnose: {name}", "", v["seconds"], None, None,
                          cpu + v["status"] + (f"; warm {warm:.2f} s" if warm is not None else "")
                          + (f"; {v['error'][:150]}" if v["error"] else ""), kind="diagnose", cpu_s=v["cpu_s"]))
    idle = cold["total_cpu_s"] / args.threads
    rows.append(H.row("diagnose: total (11 methods + consensus)", f"goal {GOAL_S:.0f} s", cold["total_s"], GOAL_S, None,
                      f"{note.strip()}; CPU {cold['total_cpu_s']:.0f} s on {args.threads} threads "
                      f"(~{idle:.0f} s wall if both cores were busy); "
                      f"{'meets' if cold['total_s'] <= GOAL_S else 'misses'} the {GOAL_S:.0f} s goal as measured",
                      kind="diagnose", cpu_s=cold["total_cpu_s"]))
    path = H.write_result("diagnose", rows, model="smollm2-135m", args=args, runs=runs, goal_s=GOAL_S)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
