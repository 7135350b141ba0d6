"""EAP-IG faithfulness (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness", COLM).

Circuits found by edge attribution patching with integrated gradients (EAP-IG) are faithful: a small fraction
of the model's edges, kept and everything else patched from the corrupted run, recovers most of the metric.
Here: `knowledge_circuits` at its defaults (EAP-IG, 5 steps, logit difference against a counterfactual subject,
the circuit sized by faithfulness: the smallest top-edge set recovering 80% of the metric) on known_1000 facts
the model answers; per fact, the share of scored edges needed to reach 80%, and the faithfulness curve.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.reproduce import common as c

NAME = "circuits"
TITLE = "EAP-IG faithfulness"
PAPER = "Hanna et al. 2024: a small fraction of the edges (EAP-IG circuits) recovers most of the metric"
DATA = "known_1000 (facts the model answers top-1), counterfactual-subject corruption"
METHOD = "knowledge_circuits"
GRID = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]  # edge fractions of the curve figure


def plan(ctx: c.Ctx) -> dict[str, Any]:
    return {"samples": ctx.n(30, 2), "dataset": "known_1000", "path": ctx.dir / "facts" / "known_1000.json"}


def command(ctx: c.Ctx) -> list[str]:
    return c.diagnose_cmd(ctx, NAME, methods=METHOD, **plan(ctx))


def run(ctx: c.Ctx) -> None:
    c.run_diagnose(ctx, NAME, methods=METHOD, timeout=ctx.budget, **plan(ctx))


def _at(curve: list[dict[str, Any]], edges: float) -> float | None:
    """The recovery of the largest measured circuit with at most `edges` edges (None: none measured that small)."""
    below = [p for p in curve if p["edges"] <= edges]
    return float(max(below, key=lambda p: p["edges"])["recovered"]) if below else None


def compute(ctx: c.Ctx) -> dict[str, Any]:
    runs = c.samples(ctx.run_dir(NAME))
    fractions, reached, curves, errors = [], 0, [], 0
    for data in runs:
        r = (data.get("results") or {}).get(METHOD)
        f = c.ok(data, METHOD)
        if f is None:
            errors += r is not None
            continue
        faith, total = f.get("faithfulness") or {}, int(f["n_edges_scored"])
        curve = faith.get("curve") or []
        if not curve or total <= 0:
            continue
        smallest = faith.get("smallest_reaching_target")
        reached += smallest is not None
        fractions.append((smallest if smallest is not None else total) / total)
        curves.append([_at(curve, g * total) for g in GRID])
    n = len(fractions)
    grid_stats = []
    for j, g in enumerate(GRID):
        vals = [cv[j] for cv in curves if cv[j] is not None]
        grid_stats.append({"fraction": g, **c.ci(vals)})
    result = {"claim": NAME, "model": ctx.model, "n": n, "target": plan(ctx)["samples"], "errors": errors,
              "command": c.shown(command(ctx)), "compute_seconds": c.seconds(runs),
              "edge_fraction_for_80": c.ci(fractions),
              "median_edge_fraction_for_80": float(np.median(fractions)) if fractions else None,
              "reached_80": c.share(reached, n), "curve": grid_stats}
    result["verdict"], result["why"] = verdict(result)
    return result


def verdict(r: dict[str, Any]) -> tuple[str, str]:
    if r["n"] < 2:
        return "not measured", "fewer than 2 facts with a faithfulness curve"
    med, reach = r["median_edge_fraction_for_80"], r["reached_80"]
    text = (f"the median fact needs {med:.2%} of the scored edges to recover 80% of the logit difference; "
            f"{reach['mean']:.0%} of the facts reach 80%")
    if med <= 0.05 and reach["mean"] >= 0.5:
        return "reproduced in shape", text + " (the paper's tasks and models differ, so only the shape is compared)"
    if reach["mean"] >= 0.5:
        return "partly reproduced", text + ", but not with a small fraction of the edges"
    return "not reproduced", text


def cell(r: dict[str, Any]) -> str:
    from benchmarks.reproduce.page import pct

    med = r["median_edge_fraction_for_80"]
    return (f"edges for 80% of the metric: median {med:.2%}, mean {pct(r['edge_fraction_for_80'], 2)}; reach 80%: "
            f"{pct(r['reached_80'], 0)}" if med is not None else "n/a")


def details(r: dict[str, Any]) -> list[str]:
    from benchmarks.reproduce.page import pct

    lines = ["| share of the scored edges kept | metric recovered (mean, 95% CI) | facts |", "|---|---|---|"]
    for g in r["curve"]:
        if g["n"]:
            lines.append(f"| {g['fraction']:.2%} | {pct(g)} | {g['n']} |")
    return lines + ["", f"Facts whose circuit search failed (e.g. the corruption does not move the metric): "
                    f"{r['errors']}."]


def figure(plt: Any, results: dict[str, dict[str, Any]], path: Any) -> bool:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m, r in results.items():
        pts = [(g["fraction"], g["mean"], g["low"], g["high"]) for g in r["curve"] if g["n"]]
        if pts:
            x, y, lo, hi = zip(*pts)
            ax.plot(x, y, marker="o", label=f"{m} (n={r['n']})")
            ax.fill_between(x, lo, hi, alpha=0.2)
    ax.axhline(0.8, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("share of edges kept (top by |EAP-IG score|)")
    ax.set_ylabel("metric recovered")
    ax.set_title("Faithfulness vs circuit size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
