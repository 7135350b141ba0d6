"""Validity of neuron localisations on real facts: do the located neurons matter to their fact, and only to it?

Protocol (docs/validity_neurons.md): the first `--facts` records of ROME's known_1000 that SmolLM2-135M
answers correctly (the answer's first token is its top-1 prediction) are run through knowledge_neurons
and fine at their defaults (paraphrases, generic-neuron screen and all), one torch thread. Per fact and
method, the causal verification (`knowmri.analysis.verification`) ablates the top 5 located neurons on
the fact, on 8 built-in unrelated facts (another relation, subject and answer) and 5 random same-layer
draws; a second control ablates them on 8 other benchmark facts of other relations (dataset controls).
Reported: how often one neuron is a fact's top knowledge neuron (raw attribution vs located set), the
mean relative change of P(answer) on the fact, on the controls and for random units, how many checks
hold up, the generic neurons found, how many prompts refined each set. `--tracing N` also runs causal
tracing on the first N facts and reports its site check (over the traced window).

    PYTHONPATH=$PWD python benchmarks/validity_neurons.py [--facts 30] [--tracing 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DATA = Path("/work/shared/data/known_1000/known_1000.json")
METHODS = ("knowledge_neurons", "fine")


def known_facts(model: Any, path: Path, n: int) -> list[Any]:
    """The first `n` known_1000 facts whose answer's first token the model predicts top-1."""
    from knowmri.sample import Sample

    out = []
    for r in json.loads(path.read_text()):
        sample = Sample(prompt=r["prompt"], ground_truth=" " + r["attribute"].strip(), triple_subject=r["subject"],
                        relation_id=r["relation_id"])
        enc = model.encode(sample["prompt"], sample["ground_truth"])
        with torch.inference_mode():
            top = int(model.forward(**enc.inputs())[0, enc.pred_pos].argmax())
        if top == enc.target_ids[0]:
            out.append(sample)
        if len(out) == n:
            break
    return out


def mean(xs: list[float | None]) -> float | None:
    values = [x for x in xs if x is not None]
    return statistics.fmean(values) if values else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=int, default=30)
    p.add_argument("--tracing", type=int, default=0, help="also run causal tracing on the first N facts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "validity_neurons.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import knowmri as km
    from knowmri.analysis.verification import located_neurons, verify_localisations
    from knowmri.methods import neuron_controls as nc

    model = km.load_model("smollm2-135m")
    facts = known_facts(model, args.data, args.facts)
    per_fact = []
    started = time.time()
    for i, sample in enumerate(facts):
        methods = [*METHODS, *(["causal_tracing"] if i < args.tracing else [])]
        t = time.time()
        report = km.diagnose(sample, model, methods=methods, progress=False, consensus=False)
        ok = {n: r for n, r in report.results.items() if r.status == "ok"}
        checks = verify_localisations(ok, model, sample) or {"methods": {}}
        fact = nc.encode_prompt(model, sample["prompt"], sample["ground_truth"])
        others = [s for s in facts if s is not sample and s["relation_id"] != sample["relation_id"]][:8]
        dataset_controls = [nc.encode_prompt(model, s["prompt"], s["ground_truth"]) for s in others]
        sets = {n: located_neurons(ok[n].findings, 5) for n in METHODS if n in ok and located_neurons(ok[n].findings, 5)}
        cross = nc.specificities(model, fact, dataset_controls, sets) if sets else {}
        row: dict[str, Any] = {"prompt": sample["prompt"], "answer": sample["ground_truth"], "seconds": time.time() - t}
        for n in methods:
            if n not in ok:
                row[n] = {"error": report.results[n].error}
                continue
            f = ok[n].findings
            c = checks["methods"].get(n, {})
            row[n] = {
                "located": [(x["layer"], x["unit"]) for x in f.get("neurons", [])[:5]],
                "raw_top": (f["top_neurons"][0]["layer"], f["top_neurons"][0]["unit"]) if f.get("top_neurons") else None,
                "generic": [(x["layer"], x["unit"]) for x in f.get("generic_neurons", [])],
                "n_prompts": f.get("n_prompts"), "warnings": f.get("warnings", []),
                "own": c.get("own"), "control": c.get("control"), "random": c.get("random"),
                "random_std": c.get("random_std"), "holds": c.get("holds"), "specificity": c.get("specificity"),
                "dataset_control": cross[n]["control"] if n in cross else None,
                "located_site": c.get("located") if n == "causal_tracing" else None,
                "layer_control": c.get("layer_control"),
            }
        per_fact.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".partial.json").write_text(json.dumps(per_fact, indent=1))
        print(f"[{i + 1}/{len(facts)}] {sample['prompt']!r} -> {sample['ground_truth']!r} ({row['seconds']:.1f} s): "
              + "; ".join(f"{n} own {_pct(row[n].get('own'))} ctrl {_pct(row[n].get('control'))} "
                          f"data {_pct(row[n].get('dataset_control'))} rand {_pct(row[n].get('random'))}"
                          for n in methods if "error" not in row[n]), flush=True)

    summary: dict[str, Any] = {}
    for n in [*METHODS, "causal_tracing"]:
        rows = [r[n] for r in per_fact if n in r and "error" not in r[n]]
        if not rows:
            continue
        tops = collections.Counter(tuple(r["located"][0]) for r in rows if r["located"])
        raw = collections.Counter(tuple(r["raw_top"]) for r in rows if r["raw_top"])
        generic = collections.Counter(tuple(g) for r in rows for g in r["generic"])
        checked = [r for r in rows if r["own"] is not None]
        summary[n] = {
            "facts": len(rows), "checked": len(checked),
            "most_common_top": (list(tops.most_common(1)[0][0]), tops.most_common(1)[0][1]) if tops else None,
            "most_common_raw_top": (list(raw.most_common(1)[0][0]), raw.most_common(1)[0][1]) if raw else None,
            "top_share": tops.most_common(1)[0][1] / len(rows) if tops else None,
            "own_mean": mean([r["own"] for r in checked]),
            "control_mean": mean([r["control"] for r in checked]),
            "dataset_control_mean": mean([r["dataset_control"] for r in checked if r["dataset_control"] is not None]),
            "random_mean": mean([r["random"] for r in checked]),
            "holds": sum(bool(r["holds"]) for r in checked),
            "generic_most_common": [[list(k), v] for k, v in generic.most_common(5)],
            "refined_over_paraphrases": sum(1 for r in rows if (r["n_prompts"] or 1) > 1),
            "layer_control_mean": mean([r["layer_control"] for r in checked if r["layer_control"] is not None]),
        }
    out = {"benchmark": "validity_neurons", "model": "smollm2-135m", "threads": args.threads, "facts": len(facts),
           "seconds": time.time() - started, "summary": summary, "per_fact": per_fact}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.0%}"


if __name__ == "__main__":
    main()
