"""Know-MRI §4.1 (Meng et al. 2025, "Know-MRI", arXiv 2506.08427): subject tokens dominate the input attributions.

The paper reads KN, FiNE, causal tracing and integrated gradients on known facts and finds the subject's tokens
carry most of the importance. Here the subject's share of each method's token importance (|score|) is divided by
its share of the tokens (1 = no more than its size), per fact, then averaged with a 95% interval. Integrated
gradients runs at its defaults on known_1000 facts the model answers; causal tracing's per-token scores (the best
hidden-state restoration at each token, over layers) come from the tracing row's run, no extra compute.
knowmri's knowledge neurons and FiNE score MLP neurons at the answer position, with no per-token scores, so their
columns cannot be formed (said on the page).
"""

from __future__ import annotations

from typing import Any

from benchmarks.reproduce import common as c
from benchmarks.reproduce.claims import tracing

NAME = "dominance"
TITLE = "Know-MRI §4.1 subject dominance"
PAPER = ("Know-MRI (2025) §4.1: subject tokens dominate the attributions across KN, FiNE, causal tracing and "
         "integrated gradients")
DATA = "known_1000 (facts the model answers top-1)"
METHOD = "integrated_gradients"


def plan(ctx: c.Ctx) -> dict[str, Any]:
    return {"samples": ctx.n(100, 4), "dataset": "known_1000", "path": ctx.dir / "facts" / "known_1000.json"}


def command(ctx: c.Ctx) -> list[str]:
    return c.diagnose_cmd(ctx, NAME, methods=METHOD, **plan(ctx))


def run(ctx: c.Ctx) -> None:
    c.run_diagnose(ctx, NAME, methods=METHOD, timeout=ctx.budget, **plan(ctx))


def dominance(scores: list[dict[str, Any]], start: int, stop: int) -> tuple[float, float, float] | None:
    """(subject share of |score|, subject share of tokens, their ratio) over the non-special tokens."""
    kept = [s for s in scores if not s.get("special")]
    total = sum(abs(float(s["score"])) for s in kept)
    if not kept or total <= 0 or stop <= start:
        return None
    subj = sum(abs(float(s["score"])) for s in kept if start <= int(s["index"]) < stop)
    tokens = sum(1 for s in kept if start <= int(s["index"]) < stop) / len(kept)
    return subj / total, tokens, (subj / total) / tokens if tokens else None


def compute(ctx: c.Ctx) -> dict[str, Any]:
    per: dict[str, list[tuple[float, float, float]]] = {"integrated_gradients": [], "causal_tracing": []}
    ig_runs = c.samples(ctx.run_dir(NAME))
    for data in ig_runs:
        f = c.ok(data, METHOD)
        if f and f.get("subject_span"):
            d = dominance(f["token_scores"], *f["subject_span"])
            if d:
                per["integrated_gradients"].append(d)
    for data in c.samples(ctx.run_dir(tracing.NAME)):
        f = c.ok(data, tracing.METHOD)
        if f and f.get("subject_span"):
            d = dominance(f["token_scores"], f["subject_span"]["start"], f["subject_span"]["stop"])
            if d:
                per["causal_tracing"].append(d)
    methods = {}
    for name, rows in per.items():
        methods[name] = {"n": len(rows), "subject_share": c.ci([r[0] for r in rows]),
                         "token_share": c.ci([r[1] for r in rows]), "dominance": c.ci([r[2] for r in rows]),
                         "above_1": c.share(sum(r[2] > 1 for r in rows), len(rows))}
    result = {"claim": NAME, "model": ctx.model, "n": min(m["n"] for m in methods.values()),
              "target": plan(ctx)["samples"], "command": c.shown(command(ctx)),
              "tracing_command": c.shown(tracing.command(ctx)), "compute_seconds": c.seconds(ig_runs),
              "methods": methods, "not_measured": {"knowledge_neurons": "scores neurons at the answer position; no "
                                                   "per-token scores", "fine": "same"}}
    result["verdict"], result["why"] = verdict(result)
    return result


def verdict(r: dict[str, Any]) -> tuple[str, str]:
    measured = {k: m for k, m in r["methods"].items() if m["n"] >= 2}
    if not measured:
        return "not measured", "fewer than 2 facts"
    dom = [k for k, m in measured.items() if m["dominance"]["low"] > 1]
    parts = [f"{k.replace('_', ' ')} {m['dominance']['mean']:.2f}x" for k, m in measured.items()]
    if len(dom) == len(measured):
        return ("reproduced in shape", "the subject's share of importance exceeds its share of tokens (CI above 1) for "
                + ", ".join(parts) + "; KN and FiNE have no per-token scores here, so 2 of the paper's 4 methods")
    if dom:
        return "partly reproduced", "CI above 1 only for " + ", ".join(dom) + " (" + ", ".join(parts) + ")"
    return "not reproduced", "no method's subject dominance has a CI above 1 (" + ", ".join(parts) + ")"


def cell(r: dict[str, Any]) -> str:
    from benchmarks.reproduce.page import num

    return "; ".join(f"{k.replace('_', ' ')} {num(m['dominance'])}x" for k, m in r["methods"].items())


def details(r: dict[str, Any]) -> list[str]:
    from benchmarks.reproduce.page import num, pct

    lines = ["| method | facts | subject's share of importance | subject's share of tokens | ratio (dominance) | "
             "facts with ratio > 1 |", "|---|---|---|---|---|---|"]
    for k, m in r["methods"].items():
        lines.append(f"| {k} | {m['n']} | {pct(m['subject_share'])} | {pct(m['token_share'])} | "
                     f"{num(m['dominance'])} | {pct(m['above_1'], 0)} |")
    lines.append("| knowledge_neurons, fine | - | not measured: " + r["not_measured"]["knowledge_neurons"] + " | | | |")
    return lines + ["", f"Causal tracing's column reuses the tracing row's run: `{r['tracing_command']}`."]
