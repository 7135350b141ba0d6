"""Validity of two read-outs on real facts: PatchScopes' decodes and integrated gradients' completeness.

On the first 12 records of ROME's known_1000 that SmolLM2-135M answers correctly (top-1 token starts the
attribute), at the methods' defaults and one torch thread:

- patchscopes: per fact, the layers whose decode names the subject beyond the source token's text, the
  layers whose decode only echoes the source token, and a check that no counted decode is an echo;
- integrated_gradients: the relative completeness gap, the steps it stopped at, the gradients computed,
  and the subject's share of the attribution against its share of the tokens.

Then the README's subject-dominance table is re-measured on the first 20 known_1000 records (all of them,
as the README's diagnose did). Writes benchmarks/results/validity_readouts_ps_ig.json.

    python benchmarks/validity_readouts_ps_ig.py [--path /work/shared/data/known_1000/known_1000.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import knowmri as km
from knowmri.methods.base import RunContext, get_method
from knowmri.methods.patchscope_text import first_line, is_echo, names_entity


def run(model, name, sample):
    method = get_method(name)
    t = time.perf_counter()
    result = method.run(model, sample, method.Params(), RunContext())
    return result, time.perf_counter() - t


def sample_of(record):
    return km.Sample(prompt=record["prompt"], ground_truth=" " + record["attribute"], triple_subject=record["subject"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", default="/work/shared/data/known_1000/known_1000.json")
    parser.add_argument("--facts", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = km.load_model("smollm2-135m")
    records = json.loads(Path(args.path).read_text())
    facts = []
    for r in records:
        token = model.predict(r["prompt"], top_k=1)[0][0]
        if (" " + r["attribute"]).startswith(token) and len(token.strip()) > 1:
            facts.append(r)
        if len(facts) == args.facts:
            break

    rows = []
    for r in facts:
        ps, ps_s = run(model, "patchscopes", sample_of(r))
        ig, ig_s = run(model, "integrated_gradients", sample_of(r))
        p, g = ps.findings, ig.findings
        counted_echoes = [layer for layer in p["recovered_layers"]
                          if is_echo(p["decoded"][layer], p["expected"], p["source_token"], p["target_prompt"])
                          or not names_entity(p["decoded"][layer], p["expected"], p["source_token"], p["target_prompt"])]
        rows.append({
            "known_id": r["known_id"], "subject": r["subject"], "source_token": p["source_token"],
            "ps_decoded_layers": p["recovered_layers"], "ps_echo_layers": p["echo_layers"],
            "ps_counted_echoes": counted_echoes, "ps_holds": p["holds"],
            "ps_first_decode": first_line(p["decoded"][p["recovered_layers"][0]]) if p["recovered_layers"] else None,
            "ps_seconds": round(ps_s, 2),
            "ig_gap": g["completeness_gap_relative"], "ig_steps": g["steps"], "ig_points": g["gradient_points"],
            "ig_history": g["steps_history"], "ig_seconds": round(ig_s, 2),
            "subject_share": g["subject_share"], "subject_token_share": g["subject_token_share"],
            "subject_dominance": g["subject_dominance"],
        })
        print(json.dumps(rows[-1]), flush=True)

    table = []
    for r in records[:20]:
        ig, _ = run(model, "integrated_gradients", sample_of(r))
        g = ig.findings
        span = range(*g["subject_span"])
        scored = [t for t in g["token_scores"] if not t["special"]]
        top = max(scored, key=lambda t: abs(t["score"]))["index"]
        last = max(span)
        mean_mag = statistics.mean(abs(t["score"]) for t in scored)
        table.append({"known_id": r["known_id"], "subject_share": g["subject_share"],
                      "subject_token_share": g["subject_token_share"], "subject_dominance": g["subject_dominance"],
                      "last_subject_token_x_mean": abs(g["token_scores"][last]["score"]) / mean_mag,
                      "top_is_subject": top in span, "gap": g["completeness_gap_relative"], "steps": g["steps"]})
    summary = {
        "facts": len(rows),
        "ps_facts_decoded": sum(r["ps_holds"] for r in rows),
        "ps_cells_decoded": sum(len(r["ps_decoded_layers"]) for r in rows),
        "ps_cells_echo": sum(len(r["ps_echo_layers"]) for r in rows),
        "ps_counted_echoes": sum(len(r["ps_counted_echoes"]) for r in rows),
        "ig_complete_5pct": sum(r["ig_gap"] is not None and r["ig_gap"] <= 0.05 for r in rows),
        "ig_steps": [r["ig_steps"] for r in rows],
        "ig_mean_points": statistics.mean(r["ig_points"] for r in rows),
        "ig_seconds_total": round(sum(r["ig_seconds"] for r in rows), 1),
        "ps_seconds_total": round(sum(r["ps_seconds"] for r in rows), 1),
        "first20_subject_share": statistics.mean(t["subject_share"] for t in table),
        "first20_subject_token_share": statistics.mean(t["subject_token_share"] for t in table),
        "first20_subject_dominance": statistics.mean(t["subject_dominance"] for t in table),
        "first20_last_subject_token_x_mean": statistics.mean(t["last_subject_token_x_mean"] for t in table),
        "first20_top_is_subject": sum(t["top_is_subject"] for t in table),
        "first20_complete_5pct": sum(t["gap"] is not None and t["gap"] <= 0.05 for t in table),
        "first20_dominance_above_1": sum(t["subject_dominance"] > 1 for t in table),
    }
    print(json.dumps(summary, indent=1))
    out = Path(__file__).parent / "results" / "validity_readouts_ps_ig.json"
    out.write_text(json.dumps({"benchmark": "validity_readouts_ps_ig", "model": "smollm2-135m", "threads": 1,
                               "summary": summary, "facts": rows, "first20": table}, indent=1))


if __name__ == "__main__":
    main()
