"""Benchmark: the whole `km.diagnose` of every method on the Eiffel fact, on SmolLM2 (goal: < 60 s on CPU).

Runs `knowmri.diagnose` with every eligible method at its default parameters (docs/API.md's: causal
tracing with 10 noise samples and the depth-scaled window, KN and IG with 20 steps, the controls, ...), as a user would, with a fresh $KNOWMRI_HOME (so SPINE trains instead of loading its cached weights: the cold,
first-run case) and `torch.set_num_threads(2)`, `--repeats` times (3; the machine is shared and
noisy, so the median of the cold runs is reported, with their spread and the matmul rate the machine
gave just before each, which shows how fast the shared machine was at that moment). A warm run (SPINE cached) is
timed too unless --quick. Reports each method's seconds, the consensus step and the total.

Then the same cold runs with the model in `--also-dtype` (default `auto`: bfloat16 where this CPU
multiplies bfloat16 natively, `knowmri.models.loading.fast_dtype`; `none` skips it), and how far its
findings agree with the first dtype's (`agreement`: the causal-tracing grids' correlation, max
difference and peak cells, the top knowledge neurons, the circuit's edges, IG's top token, each
method's token and layer scores, ...). Each run keeps the consensus's causal verification table (the
README's). Writes benchmarks/results/diagnose.json.

    python benchmarks/bench_diagnose.py [--quick] [--also-dtype bfloat16|none] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import _harness as H
import torch
from bench_floor import Dims, matmul_rate

from knowmri.analysis.verification import verification_table
from knowmri.methods import weight_cache

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
    checked = (report.consensus or {}).get("verification") or {}
    verification = {"base_prob": checked.get("base_prob"), "controls": checked.get("controls"),
                    "table": verification_table(checked)} if checked.get("methods") else checked or None
    return {"label": label, "total_s": total, "total_cpu_s": total_cpu, "methods_s": methods_s,
            "consensus_s": total - methods_s, "methods": per, "verification": verification,
            "findings": {n: r.findings for n, r in report.results.items()}}


def _corr(a: list[float], b: list[float]) -> float | None:
    x, y = torch.tensor(a, dtype=torch.float64).flatten(), torch.tensor(b, dtype=torch.float64).flatten()
    if x.numel() != y.numel() or x.numel() < 2 or float(x.std()) == 0 or float(y.std()) == 0:
        return None
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def _scores(values: list[Any]) -> list[float]:
    return [float(v["score"] if isinstance(v, dict) else v) for v in values]


def _units(neurons: list[dict], k: int = 10) -> list[tuple[int, int]]:
    return [(n["layer"], n["unit"]) for n in neurons[:k]]


def agreement(ref: dict[str, dict], other: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """How far each method's findings in `other` agree with those in `ref` (same sample, another dtype):
    the correlation of its token and layer scores and whether their best entry is the same, plus the
    method's headline (the cells, neurons, edges or tokens a reader would quote)."""
    out: dict[str, dict[str, Any]] = {}
    for name, a in ref.items():
        b = other.get(name)
        if not a or not b:
            continue
        agree: dict[str, Any] = {}
        for key in ("token_scores", "layer_scores"):
            if isinstance(a.get(key), list) and isinstance(b.get(key), list) and len(a[key]) == len(b[key]) > 1:
                x, y = _scores(a[key]), _scores(b[key])
                agree[key] = {"corr": _corr(x, y), "same_best": x.index(max(x)) == y.index(max(y))}
        if name == "causal_tracing":
            kinds = [k for k in ("hidden", "mlp", "attn") if k in a and k in b]
            agree["grid_corr"] = min(_corr(a[k], b[k]) or 0.0 for k in kinds)
            agree["max_abs_diff"] = max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in kinds)
            agree["same_peaks"] = all((a["peaks"][k]["token"], a["peaks"][k]["layer"]) == (b["peaks"][k]["token"], b["peaks"][k]["layer"])
                                      for k in kinds)
        elif name in ("knowledge_neurons", "fine"):
            key = "top_neurons" if name == "knowledge_neurons" else "neurons"
            x, y = _units(a[key]), _units(b[key])
            agree["top10_shared"] = len(set(x) & set(y))
            agree["same_top1"] = bool(x and y and x[0] == y[0])
        elif name == "knowledge_circuits":
            x, y = ({(e["src"], e["dst"]) for e in f["edges"]} for f in (a, b))
            agree["edges_jaccard"] = len(x & y) / max(1, len(x | y))
        elif name == "integrated_gradients":
            agree["same_top1"] = a["ranking"][:1] == b["ranking"][:1]
        elif name == "logit_lens":
            agree["same_first_top1_layer"] = a.get("first_top1_layer") == b.get("first_top1_layer")
        elif name == "self_explanation":
            agree["same_answer"] = a.get("answer") == b.get("answer")
            agree["same_explanation"] = a.get("explanation") == b.get("explanation")
        elif name == "spine":  # training from a seed: its dimensions shift with any rounding; the fit should not
            losses = [f.get("training", {}).get("losses", {}).get("reconstruction") or [None] for f in (a, b)]
            if losses[0][-1] is not None and losses[1][-1] is not None:
                agree["final_reconstruction_loss"] = f"{losses[0][-1]:.4f} vs {losses[1][-1]:.4f}"
        elif name == "patchscopes":
            agree["decoded_same"] = f"{sum(x == y for x, y in zip(a['decoded'], b['decoded']))}/{len(a['decoded'])}"
        out[name] = agree
    return out


def agreement_text(agree: dict[str, Any]) -> str:
    """A short line of an agreement entry (numbers rounded)."""
    parts = []
    for key, value in agree.items():
        if isinstance(value, dict):
            c = value.get("corr")
            parts.append(f"{key} r={c:.4f}" if c is not None else key + " r=–")
            if not value.get("same_best", True):
                parts[-1] += " (best differs)"
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-method and total medians of repeated runs (a method's status and error from its slowest run)."""
    import statistics

    def med(values: list[Any]) -> Any:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    out = {key: med([r[key] for r in runs]) for key in ("total_s", "total_cpu_s", "methods_s", "consensus_s")}
    out["label"] = f"median of {len(runs)} cold runs"
    out["methods"] = {}
    for name in runs[0]["methods"]:
        per = [r["methods"][name] for r in runs if name in r["methods"]]
        worst = max(per, key=lambda v: v["seconds"])
        out["methods"][name] = {"seconds": med([v["seconds"] for v in per]), "cpu_s": med([v["cpu_s"] for v in per]),
                                "status": worst["status"], "error": worst["error"]}
    return out


def cold_runs(model: Any, args: Any, dtype: torch.dtype, note: str, params: dict | None) -> list[dict[str, Any]]:
    """`--repeats` cold runs (fresh $KNOWMRI_HOME, so SPINE trains), each after a matmul-rate probe."""
    colds = []
    for i in range(max(1, args.repeats)):  # the machine is noisy: repeated cold runs, the median reported
        os.environ["KNOWMRI_HOME"] = H.scratch_home()  # cold: SPINE trains
        weight_cache.clear()  # and the per-process weight-derived values (norms) are computed again
        rate = matmul_rate(Dims.of(model), args.device, dtype)[0] / 1e9  # this moment's machine speed
        print(f"matmul rate ({str(dtype).removeprefix('torch.')}) before run {i + 1}: {rate:.0f} GFLOP/s", flush=True)
        colds.append({**one_run(model, f"cold run {i + 1} (fresh $KNOWMRI_HOME)" + note, params), "gflops": rate})
    return colds


def total_row(label: str, cold: dict[str, Any], colds: list[dict[str, Any]], note: str, threads: int, extra: str = "") -> dict:
    totals = sorted((r["total_s"], r["gflops"]) for r in colds)
    idle = cold["total_cpu_s"] / threads
    spread = (f"median of {len(totals)} cold runs ({', '.join(f'{t:.1f} s at {g:.0f} GFLOP/s' for t, g in totals)}, "
              "the matmul rate measured just before each); ")
    return H.row(label, f"goal {GOAL_S:.0f} s", cold["total_s"], GOAL_S, None,
                 f"{note.strip()}; {spread}CPU {cold['total_cpu_s']:.0f} s on {threads} threads "
                 f"(~{idle:.0f} s wall if both cores were busy); "
                 f"{'meets' if cold['total_s'] <= GOAL_S else 'misses'} the {GOAL_S:.0f} s goal as measured{extra}",
                 kind="diagnose", cpu_s=cold["total_cpu_s"])


def main() -> None:
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--also-dtype", default="auto",
                   help="time the diagnose again in this dtype and compare its findings (auto: bfloat16 where native; none)")
    args = p.parse_args()
    H.setup(args)
    model = H.load_smollm2(args)
    params = None
    note = " at the defaults"
    colds = cold_runs(model, args, H.dtype_of(args), note, params)
    runs = list(colds)
    if not args.quick:
        runs.append(one_run(model, "warm (SPINE cached)" + note, params))
    cold = median_run(colds)
    rows = []
    for name, v in cold["methods"].items():
        warm = runs[-1]["methods"].get(name, {}).get("seconds") if not args.quick else None
        cpu = f"CPU {v['cpu_s']:.1f} s; " if v["cpu_s"] is not None else ""
        rows.append(H.row(f"diagnose: {name}", "", v["seconds"], None, None,
                          cpu + v["status"] + (f"; warm {warm:.2f} s" if warm is not None else "")
                          + (f"; {v['error'][:150]}" if v["error"] else ""), kind="diagnose", cpu_s=v["cpu_s"]))
    rows.append(total_row("diagnose: total (11 methods + consensus)", cold, colds, note, args.threads))
    also, agree = _also_dtype(args), {}
    if also is not None:
        del model
        other = H.load_smollm2(argparse.Namespace(**{**vars(args), "dtype": also}))
        name = str(other.dtype).removeprefix("torch.")
        others = cold_runs(other, args, other.dtype, f" at the defaults, {name}", params)
        agree = agreement(colds[0]["findings"], others[0]["findings"])
        cold2 = median_run(others)
        for method, v in cold2["methods"].items():
            rows.append(H.row(f"diagnose [{name}]: {method}", "", v["seconds"], None, None,
                              (f"CPU {v['cpu_s']:.1f} s; " if v["cpu_s"] is not None else "") + v["status"]
                              + (f"; vs {args.dtype}: {agreement_text(agree[method])}" if agree.get(method) else ""),
                              kind="diagnose", cpu_s=v["cpu_s"], agreement=agree.get(method)))
        rows.append(total_row(f"diagnose [{name}]: total (11 methods + consensus)", cold2, others,
                              f"at the defaults, model in {name} (`load_model(..., dtype=\"{args.also_dtype}\")`)", args.threads,
                              f"; findings vs {args.dtype} in each method's row"))
        runs += others
    for r in runs:
        r.pop("findings", None)
    path = H.write_result("diagnose", rows, model="smollm2-135m", args=args, runs=runs, goal_s=GOAL_S, agreement=agree)
    print(f"wrote {path}")


def _also_dtype(args: Any) -> str | None:
    """The second dtype to time (None: none), from --also-dtype."""
    from knowmri.models.loading import fast_dtype

    if args.also_dtype in ("none", "", None) or getattr(args, "shape", None):
        return None
    name = str(fast_dtype(args.device)).removeprefix("torch.") if args.also_dtype == "auto" else args.also_dtype
    if name not in H.DTYPES:
        raise SystemExit(f"--also-dtype: unknown dtype {args.also_dtype!r}")
    return None if name == args.dtype else name


if __name__ == "__main__":
    main()
