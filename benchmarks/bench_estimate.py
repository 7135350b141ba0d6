"""Benchmark: each method's `estimate()` (seconds, memory) against what a run measures.

For every method on SmolLM2 and the Eiffel fact at the defaults (the settings `km.diagnose`
uses), this calls `method.estimate(model, sample, params)` and then runs the method, measuring
its wall time and its peak memory above the memory in use before it started: on CUDA
`torch.cuda.max_memory_allocated`, on CPU the process's resident set size sampled every
millisecond by a thread (with glibc's mmap threshold pinned at 128 KiB, so freed tensors go back to
the system and the resident size follows the tensors alive). The table shows estimate / measured for both, so a
reader can see how far to trust the estimate the web UI and `knowmri methods --estimate` show.

    python benchmarks/bench_estimate.py [--quick] [--methods a,b] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import _harness as H
import torch


class PeakMemory:
    """Peak bytes allocated above the starting level while inside (CUDA allocator or sampled RSS)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self.proc = psutil.Process()
        self.base = self.high = self.proc.memory_info().rss
        self.stop = threading.Event()

        def sample() -> None:
            while not self.stop.is_set():
                self.high = max(self.high, self.proc.memory_info().rss)
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        self.stop.set()
        self.thread.join()
        self.high = max(self.high, self.proc.memory_info().rss)
        self.peak = self.high - self.base


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # big blocks mmapped, so freed memory leaves the RSS
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default="", help="comma-separated subset (default: every eligible method)")
    args = p.parse_args()
    H.setup(args)
    from knowmri.diagnosis import run_method
    from knowmri.matching import match
    from knowmri.methods.base import RunContext, get_method

    model = H.load_smollm2(args)
    sample = H.eiffel()
    os.environ["KNOWMRI_HOME"] = H.scratch_home()  # cold: SPINE trains, as in a first diagnose
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    names = [m.name for m in match(sample, model) if m.eligible and (not wanted or m.name in wanted)]
    run_method(get_method("fine"), model, sample, None, RunContext())  # warm the kernels once
    rows, table = [], []
    for name in names:
        method = get_method(name)
        params = method.Params()
        est = method.estimate(model, sample, params)
        with PeakMemory(args.device) as mem:
            seconds, cpu, result = H.measure(lambda m=method: run_method(m, model, sample, None, RunContext()), args.device)
        entry = {"method": name, "status": result.status, "estimate_s": est.seconds, "seconds": seconds, "cpu_s": cpu,
                 "estimate_bytes": est.memory_bytes, "peak_bytes": mem.peak,
                 "time_ratio": est.seconds / seconds if seconds else None,
                 "memory_ratio": est.memory_bytes / mem.peak if mem.peak > 0 else None}
        table.append(entry)
        print(f"  {name}: estimate {H.fmt_s(est.seconds)} / measured {H.fmt_s(seconds)}; memory estimate "
              f"{est.memory_bytes / 2**20:.1f} MiB / peak {mem.peak / 2**20:.1f} MiB [{result.status}]", flush=True)
        tr = f"{entry['time_ratio']:.2f}" if entry["time_ratio"] else "–"
        mr = f"{entry['memory_ratio']:.2f}" if entry["memory_ratio"] else "–"
        rows.append(H.row(name, "estimate()", seconds, est.seconds, None,
                          f"time estimate / measured {tr}; memory estimate {est.memory_bytes / 2**20:.1f} MiB, "
                          f"measured peak {mem.peak / 2**20:.1f} MiB (estimate / measured {mr})",
                          kind="estimate", **{k: entry[k] for k in ("estimate_bytes", "peak_bytes", "memory_ratio")}))
    path = H.write_result("estimate", rows, model="smollm2-135m", args=args, methods=table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
