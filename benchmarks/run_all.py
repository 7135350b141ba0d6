"""Run every benchmarks/bench_*.py and summarise their results in one table (what `make bench` runs).

Each bench runs as its own subprocess with a time limit; a bench that fails or times out is
reported and the others still run. Every benchmarks/results/*.json is then read (tolerating
slightly different shapes, see benchmarks/README.md), and one markdown table of ratios and
equality checks is printed and written to benchmarks/results/summary.md, with the machine's
description, beside summary.json.

    python benchmarks/run_all.py [--full] [--only a,b] [--skip a,b] [--timeout 600] [--no-run]
                                 [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _harness as H

HERE = Path(__file__).resolve().parent
LOGS = H.ROOT / "build" / "bench-logs"
#: Benches run last (they time whole methods, after the comparisons).
SPECIAL_ORDER = ("bench_diagnose", "bench_floor", "bench_estimate", "bench_growth")  # run last: they time whole methods


def discover(only: list[str], skip: list[str]) -> list[Path]:
    files = sorted(HERE.glob("bench_*.py"))
    named = [f for f in files if f.stem not in SPECIAL_ORDER] + [f for f in files if f.stem in SPECIAL_ORDER]

    def short(f: Path) -> str:
        return f.stem.removeprefix("bench_")

    return [f for f in named if (not only or short(f) in only or f.stem in only)
            and short(f) not in skip and f.stem not in skip]


def arguments(path: Path, args: argparse.Namespace) -> list[str]:
    """The options a bench accepts, as far as its source shows (other authors' benches vary)."""
    source = path.read_text(errors="replace")
    if "H.parser(" in source or ("_harness import" in source and "parser(" in source):  # the harness's options
        source += '"--quick" "--device" "--dtype" "--shape"'
    out = []
    if not args.full and '"--quick"' in source:
        out.append("--quick")
    if args.shape:
        out += ["--shape", args.shape] if '"--shape"' in source else ["#--shape not supported"]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype)):
        if f'"{flag}"' in source and value:
            out += [flag, value]
        elif flag == "--device" and value != "cpu" or flag == "--dtype" and value != "float32":
            out.append(f"#{flag} not supported")
    return [a for a in out if not a.startswith("#")]


def run_one(path: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{path.stem}.log"
    cmd = [sys.executable, str(path), *arguments(path, args)]
    print(f"\n=== {path.name} {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    status, rc = "ok", None
    with log.open("w") as out:
        try:
            proc = subprocess.run(cmd, cwd=H.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=args.timeout)
            rc = proc.returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {args.timeout} s"
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace").splitlines()[-6:]
    print(f"    {status} in {seconds:.0f} s (log: {log.relative_to(H.ROOT)})", flush=True)
    if status != "ok":
        for line in tail:
            print(f"    | {line[:200]}", flush=True)
    return {"bench": path.stem, "command": " ".join(cmd[1:]), "status": status, "seconds": round(seconds, 1),
            "log": str(log.relative_to(H.ROOT)), "tail": tail}


# ---------------------------------------------------------------------- reading results
_K_KEYS = ("knowmri_s", "knowmri_median_s", "ours_s", "knowmri_seconds", "knowmri")
_B_KEYS = ("baseline_s", "baseline_median_s", "peer_s", "reference_s", "baseline_seconds")
_EQ_KEYS = ("equal", "results_equal", "allclose", "match", "same", "agree", "equal_results")
_RATIO_KEYS = ("ratio", "speedup", "speed_up")


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return _as_float(value.get("median") or value.get("median_s"))
    return None


def normalize(data: dict[str, Any], row: dict[str, Any], source: str) -> dict[str, Any]:
    """One row in the shared schema from whatever a bench wrote."""
    k = _as_float(_first(row, _K_KEYS))
    b = _as_float(_first(row, _B_KEYS))
    baseline = row.get("baseline") or row.get("compared_against") or row.get("peer") or row.get("reference")
    if b is None:  # a `<name>_s` key: the baseline's median, named after it
        for key, value in row.items():
            if (key.endswith("_s") and not key.startswith(("knowmri", "ours")) and key not in _K_KEYS
                    and _as_float(value) is not None and "all" not in key and "time" not in key):
                b = _as_float(value)
                baseline = baseline or key.removesuffix("_s").replace("_", " ")
                break
    ratio = _as_float(_first(row, _RATIO_KEYS))
    if ratio is None and k and b:
        ratio = b / k
    equal = _first(row, _EQ_KEYS)
    if equal is not None and not isinstance(equal, bool):
        equal = bool(equal) if isinstance(equal, (int, float)) else str(equal).lower() in ("true", "yes", "1")
    detail = row.get("detail") or ""
    extras = [f"{key} {row[key]:.1e}" for key in ("max_abs_diff", "max_diff") if isinstance(row.get(key), float)]
    model = row.get("model") or data.get("model") or ""
    if not detail:
        detail = ", ".join(x for x in [str(model), *extras] if x)
    method = row.get("method") or data.get("method") or data.get("benchmark") or source
    return {"method": str(method), "baseline": str(baseline or ""), "knowmri_s": k, "baseline_s": b, "ratio": ratio,
            "equal": equal, "detail": str(detail), "model": str(model), "row_model": str(row.get("model") or ""),
            "kind": row.get("kind", "compare"),
            "source": source}


def read_results(started: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, files = [], []
    for path in sorted(H.RESULTS.glob("*.json")):
        if path.name in ("summary.json",):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            files.append({"file": path.name, "status": f"unreadable: {err}"})
            continue
        raw = (data.get("rows") or data.get("results") or []) if isinstance(data, dict) else data
        if isinstance(raw, dict):
            raw = [dict(v, method=v.get("method", k)) if isinstance(v, dict) else {"method": k} for k, v in raw.items()]
        data = data if isinstance(data, dict) else {}
        fresh = path.stat().st_mtime >= started
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        files.append({"file": path.name, "benchmark": data.get("benchmark", path.stem), "rows": len(raw),
                      "fresh": fresh, "written": stamp, "machine": data.get("machine")})
        for r in raw:
            if isinstance(r, dict):
                n = normalize(data, r, path.stem)
                n["stale"] = None if fresh else stamp
                rows.append(n)
    return rows, files


# ---------------------------------------------------------------------- the summary
def _eq(value: bool | None) -> str:
    return {True: "yes", False: "**NO**", None: "–"}[value]


def setting(r: dict[str, Any]) -> str:
    """The model/setting a row was measured on: the row's own model, else the start of its detail."""
    model = r.get("row_model") or ""
    if not model:
        head = r["detail"].split(";")[0]
        model = head.split(":")[0] if ":" in head else head.split(",")[0]
    return model.strip()


def _settings(rows: list[dict[str, Any]]) -> list[str]:
    """`setting` per row, extended with the next part of the detail where two rows would read the same."""
    out = [setting(r) for r in rows]
    keys = [(r["method"], s, r["baseline"]) for r, s in zip(rows, out)]
    for i, r in enumerate(rows):
        if keys.count(keys[i]) > 1:
            rest = r["detail"][len(out[i]):].lstrip(":;, ").split(";")[0]
            out[i] += " (" + ",".join(rest.split(",")[:2]).strip() + ")"
    return out


def comparison_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | on | compared against | knowmri median | peer median | ratio (peer / knowmri) | results equal? |",
             "|---|---|---|---|---|---|---|"]
    for r, on in zip(rows, _settings(rows)):
        stale = f" *(stale: {r['stale']})*" if r.get("stale") else ""
        lines.append(f"| {r['method']}{stale} | {on} | {r['baseline']} | {H.fmt_s(r['knowmri_s'])} | "
                     f"{H.fmt_s(r['baseline_s'])} | {H.fmt_ratio(r['ratio'])} | {_eq(r['equal'])} |")
    return "\n".join(lines)


def other_tables(rows: list[dict[str, Any]]) -> str:
    parts = []
    floor = [r for r in rows if r["kind"] == "floor"]
    if floor:
        parts += ["\n### Distance from the FLOP floor (SmolLM2, 2 threads)\n",
                  "| method | time | floor time | time / floor | work the algorithm needs |", "|---|---|---|---|---|"]
        for r in floor:
            over = r["knowmri_s"] / r["baseline_s"] if r["knowmri_s"] and r["baseline_s"] else None
            parts.append(f"| {r['method']} | {H.fmt_s(r['knowmri_s'])} | {H.fmt_s(r['baseline_s'])} | "
                         f"{'–' if over is None else f'{over:.1f}x'} | {r['detail']} |")
        if any(r["method"].endswith(")") for r in floor):
            parts.append("\nRows without a dtype are the default (float32), which the goal (every method within 3x of "
                         "its floor) is about; rows marked with a dtype are the same methods in that dtype, for comparison.")
    diag = [r for r in rows if r["kind"] == "diagnose"]
    if diag:
        parts += ["\n### `km.diagnose` of every method on the Eiffel fact (SmolLM2, 2 threads)\n",
                  "| step | seconds | note |", "|---|---|---|"]
        def order(r: dict[str, Any]) -> tuple:  # the default dtype's steps, its total, then another dtype's
            return ("[" in r["method"], r["method"].endswith("total (11 methods + consensus)"), -(r["knowmri_s"] or 0))

        for r in sorted(diag, key=order):
            step = r["method"].removeprefix("diagnose: ")
            if step.startswith("diagnose ["):  # "diagnose [bfloat16]: spine" -> "spine (bfloat16)"
                dtype, _, name = step.removeprefix("diagnose [").partition("]: ")
                step = f"{name} ({dtype})"
            parts.append(f"| {step} | {H.fmt_s(r['knowmri_s'])} | {r['detail']} |")
    est = [r for r in rows if r["kind"] == "estimate"]
    if est:
        parts += ["\n### `estimate()` against measurement (SmolLM2, defaults)\n",
                  "| method | measured | estimated | detail |", "|---|---|---|---|"]
        for r in est:
            parts.append(f"| {r['method']} | {H.fmt_s(r['knowmri_s'])} | {H.fmt_s(r['baseline_s'])} | {r['detail']} |")
    growth = [r for r in rows if r["kind"] == "growth"]
    if growth:
        parts += ["\n### Measured growth (fitted exponent of time vs size)\n", "| method | growth |", "|---|---|"]
        for r in growth:
            parts.append(f"| {r['method'].removeprefix('growth: ')} | {r['detail']} |")
    return "\n".join(parts)


def machine_lines(machine: dict[str, Any], load_end: list[float] | None) -> str:
    pk = ", ".join(f"{k} {v}" for k, v in (machine.get("packages") or {}).items() if v)
    return (f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['cores_usable']} usable), "
            f"torch {machine['torch']} with {machine['torch_threads']} threads, {machine['device']} {machine['dtype']}, "
            f"Python {machine['python']}; {pk}. Date {machine['date']}, commit {machine.get('commit') or '?'}. "
            f"Load average at start {machine.get('load_average')}, at end {load_end} "
            f"(the machine is shared: compare ratios, not absolute times).")


def _timestamp(iso: str | None) -> float | None:
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the benches' full settings (default: their --quick ones)")
    p.add_argument("--only", default="", help="comma-separated bench names (e.g. patching_peers,floor)")
    p.add_argument("--skip", default="", help="comma-separated bench names to leave out")
    p.add_argument("--timeout", type=int, default=900, help="seconds per bench before it is stopped")
    p.add_argument("--no-run", action="store_true", help="only collect the existing results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--shape", default=None, help="a random-weight model of this shape instead of SmolLM2 (see _harness.SHAPES)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    started = time.time()
    machine = H.machine(args.device, args.dtype)
    machine["torch_threads"] = args.threads
    env = dict(os.environ)
    home = H.bench_home()
    if home is not None:
        env["KNOWMRI_HOME"] = str(home)
    env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(H.ROOT), env.get("PYTHONPATH", "")]))})
    runs: list[dict[str, Any]] = []
    last_load: list[float] | None = None
    previous = H.RESULTS / "summary.json"
    if args.no_run and previous.is_file():  # re-collect: keep the last run's machine, runs and start time
        try:
            last = json.loads(previous.read_text())
            runs, machine = last.get("runs", []), last.get("machine", machine)
            started = last.get("started") or _timestamp(machine.get("date")) or started
            last_load = last.get("load_average_end")
        except (OSError, ValueError):
            pass
    if not args.no_run:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        skip = [s.strip() for s in args.skip.split(",") if s.strip()]
        for path in discover(only, skip):
            runs.append(run_one(path, args, env))
    rows, files = read_results(started if runs else 0.0)
    compare = [r for r in rows if r["kind"] not in ("floor", "diagnose", "growth", "estimate")]
    load_end = last_load or ([round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None)
    table = comparison_table(compare)
    print("\n" + table)
    total = sum(r["seconds"] for r in runs) if args.no_run else time.time() - started
    md = ["# knowmri benchmarks: summary", "", machine_lines(machine, load_end), "",
          f"Settings: {'full' if args.full else 'reduced (--quick)'}; each bench's own settings are in its JSON. "
          f"Ratio = peer median / knowmri median (above 1: knowmri is faster). Total run {total / 60:.1f} min.", "",
          table, other_tables(rows), "", "### Bench runs", "", "| bench | status | seconds |", "|---|---|---|"]
    md += [f"| {r['bench']} | {r['status']} | {r['seconds']:.0f} |" for r in runs] or ["| (none run) | | |"]
    stale = [f for f in files if not f.get("fresh", True)]
    if stale and runs:
        md += ["", "Results not refreshed by this run (kept from earlier): "
               + ", ".join(f"{f['file']} ({f['written']})" for f in stale)]
    H.RESULTS.mkdir(parents=True, exist_ok=True)
    (H.RESULTS / "summary.md").write_text("\n".join(md) + "\n")
    (H.RESULTS / "summary.json").write_text(json.dumps(
        {"machine": machine, "load_average_end": load_end, "settings": vars(args), "runs": runs, "files": files,
         "rows": rows, "total_s": total, "started": started}, indent=2, default=str))
    print(f"\nwrote {H.RESULTS / 'summary.md'} and summary.json ({total / 60:.1f} min)")
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        print("benches that did not finish: " + ", ".join(f"{r['bench']} ({r['status']})" for r in failed))


if __name__ == "__main__":
    main()
