"""Knowledge neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers", ACL).

On BERT-base with PARAREL: suppressing a fact's knowledge neurons (zeroing them) changes P(correct answer) by
-29% on average, amplifying them (doubling) by +31%; random neurons change it by about 1%; the effect on facts
of other relations is small. Here: `knowledge_neurons` at its defaults (20 IG steps, threshold 0.2 of the top
attribution, refined over the fact's prompts with p 0.7, generic neurons screened out) on PARAREL facts whose
paraphrased prompts the model answers; then its refined neurons are zeroed and doubled on the fact's prompts,
on facts of *other* PARAREL relations (inter-relation), and against random units of the same layers.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from benchmarks.reproduce import common as c

NAME = "neurons"
TITLE = "Knowledge neurons"
PAPER = ("Dai et al. 2022, BERT-base, PARAREL: suppressing a fact's neurons -29% P(correct), amplifying +31%, "
         "random neurons ~1%; the effect on other relations' facts is small")
DATA = "PARAREL (facts whose paraphrases the model answers top-1; up to 3 prompts each)"
METHOD = "knowledge_neurons"
CONTROLS = 5


def plan(ctx: c.Ctx) -> dict[str, Any]:
    return {"samples": ctx.n(30, 3), "dataset": str(ctx.dir / "facts" / "pararel.json"), "path": None}


def command(ctx: c.Ctx) -> list[str]:
    return c.diagnose_cmd(ctx, NAME, methods=METHOD, **plan(ctx))


def run(ctx: c.Ctx) -> None:
    c.run_diagnose(ctx, NAME, methods=METHOD, timeout=ctx.budget, **plan(ctx))


def compute(ctx: c.Ctx) -> dict[str, Any]:
    runs = c.samples(ctx.run_dir(NAME))
    rows = []
    model = None
    for data in runs:
        f = c.ok(data, METHOD)
        if f is None or not f.get("neurons"):
            if f is not None:
                rows.append({"index": data["index"], "neurons": 0})
            continue
        if model is None:
            model = ctx.load_model()
        rows.append(_effects(model, data, f, runs))
    measured = [r for r in rows if r.get("neurons")]
    keys = ("suppress", "amplify", "random", "other_suppress", "other_amplify")
    result: dict[str, Any] = {
        "claim": NAME, "model": ctx.model, "n": len(measured), "ran": len(rows), "target": plan(ctx)["samples"],
        "command": c.shown(command(ctx)), "compute_seconds": c.seconds(runs),
        "neurons_per_fact": c.ci([r["neurons"] for r in measured]),
        "facts_without_neurons": len(rows) - len(measured),
        **{k: c.ci([r[k] for r in measured]) for k in keys},
        "median": {k: float(np.median([r[k] for r in measured if r[k] is not None])) if measured else None
                   for k in keys}, "rows": rows}
    result["verdict"], result["why"] = verdict(result)
    return result


def _effects(model: Any, data: dict[str, Any], f: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Relative change of P(answer) with the fact's refined neurons zeroed / doubled, averaged over its prompts."""
    from knowmri.methods import neuron_controls as nc

    sample = data["sample"]
    neurons = [(int(x["layer"]), int(x["unit"])) for x in f["neurons"] if not x.get("generic")]
    others = [d["sample"] for d in runs if d["sample"].get("relation_id") != sample.get("relation_id")]
    random.Random(int(data["index"])).shuffle(others)
    controls = [nc.encode_prompt(model, o["prompt"], o["ground_truth"]) for o in others[:CONTROLS]]
    per_prompt = []
    for prompt in sample.get("prompts") or [sample["prompt"]]:
        fact = nc.encode_prompt(model, prompt, sample["ground_truth"])
        per_prompt.append(nc.specificity(model, fact, controls, neurons, draws=5, seed=int(data["index"])))
    mean = lambda key: sum(p[key] for p in per_prompt) / len(per_prompt)  # noqa: E731
    return {"index": data["index"], "relation": sample.get("relation_id"), "neurons": len(neurons),
            "prompts": len(per_prompt), "suppress": mean("own"), "amplify": mean("own_amplified"),
            "random": mean("random"), "other_suppress": per_prompt[0]["control"] if controls else None,
            "other_amplify": per_prompt[0]["control_amplified"] if controls else None}


def verdict(r: dict[str, Any]) -> tuple[str, str]:
    s, a, rnd, o = r["suppress"], r["amplify"], r["random"], r["other_suppress"]
    if r["n"] < 2:
        return "not measured", "fewer than 2 facts with located neurons"
    checks = {
        "suppressing lowers P(correct) (CI below 0)": s["high"] < 0,
        "amplifying raises it (CI above 0)": a["low"] > 0,
        "random units change it by under 5%": abs(rnd["mean"]) < 0.05,
        "other relations' facts move by under 10% (small)": o["mean"] is None or abs(o["mean"]) < 0.1,
    }
    failed = [k for k, v in checks.items() if not v]
    if failed:
        return ("partly reproduced" if len(failed) <= 1 else "not reproduced"), c.not_true(failed, len(checks))
    near = s["low"] <= -0.29 <= s["high"] and a["low"] <= 0.31 <= a["high"]
    return ("reproduced" if near else "reproduced in shape",
            "every direction holds" + ("" if near else f"; the sizes differ from BERT-base's (suppress "
                                       f"{s['mean']:+.0%}, amplify {a['mean']:+.0%} vs -29% / +31%)"))


def cell(r: dict[str, Any]) -> str:
    from benchmarks.reproduce.page import pct

    return (f"suppress {pct(r['suppress'], signed=True)}, amplify {pct(r['amplify'], signed=True)}, random "
            f"{pct(r['random'], signed=True)}, other relations {pct(r['other_suppress'], signed=True)}")


def details(r: dict[str, Any]) -> list[str]:
    from benchmarks.reproduce.page import num, pct

    return ["| measure (relative change of P(correct)) | ours (95% CI) | paper |", "|---|---|---|",
            f"| the fact's neurons zeroed, on its prompts | {pct(r['suppress'], signed=True)} | -29% |",
            f"| the fact's neurons doubled, on its prompts | {pct(r['amplify'], signed=True)} | +31% |",
            f"| as many random units of the same layers zeroed | {pct(r['random'], signed=True)} | ~1% |",
            f"| the fact's neurons zeroed, on {CONTROLS} facts of other relations | "
            f"{pct(r['other_suppress'], signed=True)} | small |",
            f"| the fact's neurons doubled, on those facts | {pct(r['other_amplify'], signed=True)} | small |",
            "", "Medians (a relative change is heavy-tailed when P(correct) starts low): "
            + ", ".join(f"{k.replace('_', ' ')} {v:+.0%}" for k, v in r["median"].items() if v is not None) + ".",
            "", f"Neurons per fact: {num(r['neurons_per_fact'], 1)}; facts where no neuron survived the refinement "
            f"and the generic-neuron screen: {r['facts_without_neurons']} of {r['ran']}."]
