"""Validity of knowledge circuits on real facts: are the default circuits faithful?

Runs SmolLM2-135M on the first `--facts` known_1000 facts it answers correctly (top-1 first token),
with `knowledge_circuits` at its defaults (EAP-IG, 5 steps, counterfactual corruption, the smallest
circuit recovering 80% of the logit difference), and records per fact: the corrupting subject, the
contrast answer and the model's answer on the corrupted prompt (a function word or not), the clean
and corrupted metric, the chosen size, the circuit's edges and nodes, the share recovered, the
faithfulness curve, `holds`, the warnings, the patched passes and the seconds. With `--top-n N`
(default 50, 0 to skip) each fact also runs with that fixed size (the old default), for comparison.

    python benchmarks/validity_circuits.py [--facts 20] [--threads 1] [--top-n 50]

Writes benchmarks/results/validity_circuits.json; docs/validity_circuits.md records a run.
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


def row(result: Any) -> dict[str, Any]:
    """What one knowledge-circuits result says."""
    from knowmri.methods.circuits_corruption import is_function_word

    if result.status != "ok":
        return {"status": result.status, "error": result.error}
    f = result.findings
    faith, c = f["faithfulness"], f["corruption"]
    return {"status": "ok", "corruption": c["kind"], "contrast_subject": f["contrast_subject"],
            "contrast_answer": f["contrast_answer"], "model_answer": c["model_answer"],
            "function_word": is_function_word(c["model_answer"]), "rank": c.get("rank"), "source": c["source"],
            "metric_clean": f["metric_clean"], "metric_corrupted": f["metric_corrupted"],
            "chosen_size": faith["chosen_size"], "circuit_edges": faith["circuit_edges"], "nodes": faith["nodes"],
            "recovered": faith["recovered"], "holds": f.get("holds"), "warnings": f.get("warnings", []),
            "passes": faith["patched_passes"], "curve": faith["curve"], "seconds": result.seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top-n", type=int, default=50, help="also run with this fixed size (0: skip)")
    p.add_argument("--path", default=str(DATA))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "validity_circuits.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import knowmri as km
    from knowmri.diagnosis import run_method
    from knowmri.methods.base import RunContext, get_method

    model = km.load_model("smollm2-135m")
    dataset = km.load_dataset("known_1000", path=args.path)
    facts = correct_facts(model, dataset, args.facts)
    method = get_method("knowledge_circuits")
    rows = []
    for i, sample in facts:
        start = time.perf_counter()
        out = {"index": i, "prompt": sample["prompt"], "answer": sample["ground_truth"],
               "relation_id": sample.get("relation_id"), "default": row(run_method(method, model, sample, {}, RunContext()))}
        if args.top_n:
            fixed = run_method(method, model, sample, {"top_n": args.top_n}, RunContext())
            out["top_n"] = row(fixed) if fixed.status == "ok" else {"status": fixed.status, "error": fixed.error}
        d = out["default"]
        if d["status"] == "ok":
            fixed_text = ""
            if args.top_n:
                t = out["top_n"]
                fixed_text = (f" | top {args.top_n}: {t['recovered']:.0%}" if t["status"] == "ok"
                              else f" | top {args.top_n}: {t['error'][:60]}")
            print(f"[{i}] {sample['prompt']!r} -> {sample['ground_truth']!r} vs {d['contrast_answer']!r} "
                  f"({d['contrast_subject']!r}, answers {d['model_answer']!r}): {d['chosen_size']} top edges, "
                  f"{d['circuit_edges']} kept, {d['nodes']} nodes, {d['recovered']:.0%} in {d['seconds']:.1f}s"
                  f"{fixed_text}", flush=True)
        else:
            print(f"[{i}] {sample['prompt']!r}: {d['error']}", flush=True)
        out["seconds"] = time.perf_counter() - start
        rows.append(out)

    ok = [r["default"] for r in rows if r["default"]["status"] == "ok"]
    summary: dict[str, Any] = {
        "facts": len(rows), "ok": len(ok), "errors": len(rows) - len(ok),
        "recovered_mean": statistics.fmean(r["recovered"] for r in ok) if ok else None,
        "recovered_min": min((r["recovered"] for r in ok), default=None),
        "recovered_max": max((r["recovered"] for r in ok), default=None),
        "empty": sum(1 for r in ok if r["circuit_edges"] == 0), "unfaithful": sum(1 for r in ok if not r["holds"]),
        "chosen_size_median": statistics.median(r["chosen_size"] for r in ok) if ok else None,
        "chosen_size_range": [min(r["chosen_size"] for r in ok), max(r["chosen_size"] for r in ok)] if ok else None,
        "circuit_edges_median": statistics.median(r["circuit_edges"] for r in ok) if ok else None,
        "nodes_median": statistics.median(r["nodes"] for r in ok) if ok else None,
        "function_word_answers": sum(1 for r in ok if r["function_word"]),
        "counterfactual": sum(1 for r in ok if r["corruption"] == "counterfactual"),
        "same_relation_subjects": sum(1 for r in ok if str(r["source"]).startswith("relation")),
        "seconds_mean": statistics.fmean(r["seconds"] for r in ok) if ok else None,
        "passes_mean": statistics.fmean(r["passes"] for r in ok) if ok else None,
    }
    if args.top_n:
        fixed = [r["top_n"] for r in rows if r["top_n"]["status"] == "ok"]
        summary[f"top_{args.top_n}"] = {
            "ok": len(fixed), "errors": len(rows) - len(fixed),
            "recovered_mean": statistics.fmean(r["recovered"] for r in fixed) if fixed else None,
            "recovered_min": min((r["recovered"] for r in fixed), default=None),
            "recovered_max": max((r["recovered"] for r in fixed), default=None)}
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "validity_circuits", "model": "smollm2-135m",
                                          "threads": args.threads, "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
