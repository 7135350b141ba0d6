"""Validity of the causal-tracing, dataset-aggregate and consensus read-outs on real facts.

Runs SmolLM2-135M on the first `--facts` known_1000 facts it answers correctly (top-1 first token),
at the defaults (causal tracing: 10 noise samples, the depth-scaled window), and records:

- causal tracing: the clean and corrupted P, the total effect (their difference), the peak hidden
  indirect effect at the subject's last token with its 95% interval over the noise samples, the
  per-cell standard errors, each peak's layer range over resampled noise, the warnings and `holds`;
- the dataset aggregate (`knowmri.analysis.Aggregator`): the means over facts with their 95% intervals;
- with `--all-methods` (every eligible method, as `km.diagnose` runs them), the consensus: that no
  layer is listed for a method that found nothing (`holds` False, `first_top1_layer` None) and that
  no generic neuron is among the shared ones; each layer row's evidence.

    python benchmarks/validity_tracing.py [--facts 12] [--threads 1] [--all-methods]

Writes benchmarks/results/validity_tracing.json; docs/validity_tracing.md records a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DATA = Path("/work/shared/data/known_1000/known_1000.json")


def correct_facts(model: Any, dataset: Any, n: int) -> list[tuple[int, Any]]:
    """The first `n` records whose answer's first token is the model's top-1 prediction."""
    out = []
    for i in range(len(dataset)):
        sample = dataset[i]
        enc = model.encode(sample["prompt"], sample["ground_truth"])
        with torch.inference_mode():
            logits = model.run(**enc.inputs(), keep=[enc.pred_pos]).logits[0]
        if int(logits[-1].argmax()) == int(enc.target_ids[0]):
            out.append((i, sample))
            if len(out) == n:
                break
    return out


def tracing_row(f: dict[str, Any]) -> dict[str, Any]:
    """What one causal-tracing result says, and how sure it is."""
    stderr = torch.tensor(f["hidden_stderr"])
    last_subject = f["role_effects"]["hidden"].get("subject_last")
    return {
        "high": f["high_score"], "low": f["low_score"], "total_effect": f["high_score"] - f["low_score"],
        "low_stderr": f["low_stderr"], "window": f["window"], "holds": f["holds"], "warnings": f["warnings"],
        "hidden_stderr_median": float(stderr.median()), "hidden_stderr_max": float(stderr.max()),
        "peaks": {k: {x: p[x] for x in ("token_text", "layer", "effect", "ci", "layer_range", "same_token_share")}
                  for k, p in f["peaks"].items()},
        "last_subject_hidden": last_subject,
    }


def consensus_row(report: Any) -> dict[str, Any]:
    """The consensus's layer table, and whether it lists anything for a result that found nothing."""
    c = report.consensus
    nothing = [n for n, r in report.results.items() if r.status == "ok" and (
        r.findings.get("holds") is False or ("first_top1_layer" in r.findings and r.findings["first_top1_layer"] is None))]
    listed = list(c.get("peak_layers", {}))
    wrong = [label for label in listed for n in nothing if label == n or label.startswith(n + " ")]
    generic = {(x["layer"], x["unit"]) for r in report.results.values() if r.status == "ok"
               for x in r.findings.get("neurons") or [] if isinstance(x, dict) and x.get("generic")}
    shared_generic = [s for s in c.get("shared_neurons", []) if (s["layer"], s["unit"]) in generic]
    layers = next((t for t in c.get("tables", []) if t["name"].startswith("Layers each method")), None)
    return {"found_nothing": nothing, "listed": listed, "listed_for_nothing": wrong, "shared_generic": shared_generic,
            "rows": layers["rows"] if layers else [], "error": c.get("error"),
            "status": {n: r.status for n, r in report.results.items()}}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from knowmri.stats import mean_ci

    effects = [r["tracing"]["total_effect"] for r in rows]
    last = [r["tracing"]["last_subject_hidden"] for r in rows if r["tracing"]["last_subject_hidden"]]
    peak = [x["effect"] for x in last]
    widths = [x["ci"][1] - x["ci"][0] for x in last]
    hidden_layers = [r["tracing"]["peaks"]["hidden"]["layer_range"] for r in rows if "hidden" in r["tracing"]["peaks"]]
    out = {
        "facts": len(rows), "window": rows[0]["tracing"]["window"] if rows else None,
        "total_effect_mean_ci": mean_ci(effects) if effects else None,
        "last_subject_hidden_ie_mean_ci": mean_ci(peak) if peak else None,
        "last_subject_hidden_ci_width_median": statistics.median(widths) if widths else None,
        "last_subject_hidden_ci_excludes_0": sum(1 for x in last if x["ci"][0] > 0),
        "hidden_stderr_median": statistics.median(r["tracing"]["hidden_stderr_median"] for r in rows),
        "hidden_peak_layer_range_width_median": statistics.median(b - a for a, b in hidden_layers) if hidden_layers else None,
        "holds": sum(1 for r in rows if r["tracing"]["holds"]),
        "warned": {kind: sum(1 for r in rows if any(w.startswith(kind) for w in r["tracing"]["warnings"]))
                   for kind in ("small drop", "restoring", "the ")},
        "seconds_median": statistics.median(r["seconds"] for r in rows),
    }
    if rows and "consensus" in rows[0]:
        out["consensus_listed_for_nothing"] = sum(len(r["consensus"]["listed_for_nothing"]) for r in rows)
        out["consensus_shared_generic"] = sum(len(r["consensus"]["shared_generic"]) for r in rows)
        out["consensus_found_nothing"] = {n: sum(1 for r in rows if n in r["consensus"]["found_nothing"])
                                          for r in rows for n in r["consensus"]["found_nothing"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--all-methods", action="store_true", help="run every eligible method and the consensus")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "validity_tracing.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import knowmri as km
    from knowmri.analysis import Aggregator
    from knowmri.report.report import Report

    model = km.load_model("smollm2-135m")
    dataset = km.load_dataset("known_1000", path=args.data)
    facts = correct_facts(model, dataset, args.facts)
    agg = Aggregator(model)
    rows = []
    for index, sample in facts:
        start = time.perf_counter()
        methods = None if args.all_methods else ["causal_tracing"]
        report = km.diagnose(sample, model, methods=methods, progress=False, consensus=args.all_methods)
        seconds = time.perf_counter() - start
        tracing = report["causal_tracing"]
        if tracing.status != "ok":
            print(f"  fact {index}: causal tracing {tracing.status}: {tracing.error}", flush=True)
            continue
        row = {"index": index, "prompt": sample["prompt"], "answer": sample["ground_truth"], "seconds": seconds,
               "tracing": tracing_row(tracing.findings)}
        if args.all_methods:
            row["consensus"] = consensus_row(report)
        rows.append(row)
        agg.add(index, sample, report.results)
        t = row["tracing"]
        ls = t["last_subject_hidden"] or {}
        print(f"  fact {index} {sample['prompt']!r} -> {sample['ground_truth']!r}: P {t['high']:.3f} -> {t['low']:.3f}, "
              f"last-subject hidden IE {ls.get('effect', float('nan')):.3f} "
              f"[{ls.get('ci', [float('nan')] * 2)[0]:.3f}, {ls.get('ci', [float('nan')] * 2)[1]:.3f}], "
              f"{len(t['warnings'])} warnings, {seconds:.0f} s", flush=True)
    aggregate = Report(model=model.info(), sample={"dataset": "known_1000", "samples": len(rows)})
    agg.report(aggregate)
    f = aggregate["causal_tracing"].findings if "causal_tracing" in aggregate.results else {}
    summary = summarise(rows)
    info = {"benchmark": "validity_tracing", "model": "smollm2-135m", "threads": torch.get_num_threads(),
            "all_methods": args.all_methods, "summary": summary, "facts": rows,
            "aggregate": {k: f.get(k) for k in ("role_share", "role_share_ci", "hidden_by_role", "hidden_by_role_ci",
                                                "layer_scores", "top_role_counts", "top_role_ci")},
            "aggregate_summaries": {n: r.summary for n, r in aggregate.results.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1, default=float))
    print(json.dumps(summary, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
