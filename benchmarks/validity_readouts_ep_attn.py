"""Validity of two read-outs on real facts: embedding projection and attention weights (docs/validity_readouts.md).

On the first N known_1000 facts (in file order) that SmolLM2-135M answers top-1, at the methods' defaults:
- embedding_projection: does the last layer's reading (through the final norm, the default) rank the model's
  own output first (`agrees_with_output`)? And the raw projection (no final norm, the former default): the
  answer's rank after the last layer, kept beside it in `target_rank_direct`;
- attention_weights: which positions are attention sinks, and is the headline head's score attention parked
  on a sink? For comparison, the former ranking (attention mass on the whole subject span, sink included):
  how often its top head's "subject" mass is mostly the sink at position 0.

    PYTHONPATH=$PWD python benchmarks/validity_readouts_ep_attn.py [--facts 12] [--data PATH]

Single-threaded (a shared machine); writes benchmarks/results/validity_readouts_ep_attn.json.
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

DATA = "/work/shared/data/known_1000/known_1000.json"


def answered(model: km.Model, samples: list, n: int) -> list:
    """The first `n` samples whose answer's first token is the model's top-1 prediction."""
    out = []
    for sample in samples:
        enc = model.encode(sample["prompt"], sample["ground_truth"])
        with torch.inference_mode():
            top = int(model.forward(**enc.inputs())[0, enc.pred_pos].argmax())
        if top == enc.target_ids[0]:
            out.append(sample)
            if len(out) == n:
                break
    return out


def run(name: str, model: km.Model, sample: km.Sample) -> tuple[dict, str, float]:
    method = get_method(name)
    start = time.perf_counter()
    result = method.run(model, sample, method.Params(), RunContext())
    return result.findings, result.summary, time.perf_counter() - start


def clean_mass(aw: dict, per_head: torch.Tensor, subject: list[int]) -> float:
    """The headline head's attention on its basis (the subject, else the content tokens) with no sink or special
    token counted: its score must not exceed this."""
    excluded = set(aw["excluded_positions"])
    basis = subject if aw["head_score_basis"] == "subject" else [t for t in range(per_head.shape[-1])
                                                                    if t != aw["position"]]
    top = aw["heads"][0]
    return sum(float(per_head[top["layer"], top["head"], t]) for t in basis if t not in excluded)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=12)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "validity_readouts_ep_attn.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = km.load_model("smollm2-135m")
    facts = answered(model, list(km.load_dataset("known_1000", path=args.data)), args.facts)
    rows = []
    for sample in facts:
        ep, _, ep_s = run("embedding_projection", model, sample)
        aw, summary, aw_s = run("attention_weights", model, sample)
        per_head = torch.tensor(aw["last_token_attention_per_head"])  # [L, H, T]
        span = aw["subject_span"]
        subject = list(range(span["start"], span["stop"])) if span else []
        top = aw["heads"][0]
        old = per_head[:, :, subject].sum(-1) if subject else torch.zeros(per_head.shape[:2])
        old_top = divmod(int(old.argmax()), per_head.shape[1])
        old_on_sink = sum(float(per_head[old_top][t]) for t in subject if t in aw["sinks"])
        rows.append({
            "prompt": sample["prompt"], "answer": sample["ground_truth"], "subject": sample.get("triple_subject"),
            "ep_agrees_with_output": ep["agrees_with_output"], "ep_rank_last": ep["target_rank"][-1],
            "ep_rank_direct_last": ep["target_rank_direct"][-1], "ep_best_rank_direct": min(ep["target_rank_direct"]),
            "ep_first_top1_layer": ep["first_top1_layer"], "ep_holds": ep["holds"], "ep_warnings": ep["warnings"],
            "ep_seconds": round(ep_s, 3),
            "aw_sinks": aw["sinks"], "aw_basis": aw["head_score_basis"],
            "aw_position0_sink_heads": aw["sink_heads"][0], "aw_other_sink_heads_max": max(aw["sink_heads"][1:]),
            "aw_headline": [top["layer"], top["head"], round(top["score"], 4), round(top["share"], 4)],
            "aw_headline_counts_a_sink": float(top["score"]) > clean_mass(aw, per_head, subject) + 1e-5,
            "aw_headline_is_sink_head": bool(aw["sinks"]) and int(per_head[top["layer"], top["head"]].argmax())
            in aw["sinks"],
            "aw_old_headline": [*old_top, round(float(old.max()), 4)],
            "aw_old_headline_mostly_sink": old_on_sink > 0.5 * float(old.max()),
            "aw_summary_mentions_sink": "attention sink" in summary,
            "aw_seconds": round(aw_s, 3),
        })
        print(json.dumps(rows[-1]), flush=True)
    n = len(rows)
    summary = {
        "facts": n,
        "ep_agrees_with_output": sum(r["ep_agrees_with_output"] for r in rows),
        "ep_rank1_last_layer": sum(r["ep_rank_last"] == 1 for r in rows),
        "ep_direct_rank1_last_layer": sum(r["ep_rank_direct_last"] == 1 for r in rows),
        "ep_direct_median_rank_last_layer": statistics.median(r["ep_rank_direct_last"] for r in rows),
        "ep_holds": sum(r["ep_holds"] for r in rows),
        "aw_position0_sink": sum(0 in r["aw_sinks"] for r in rows),
        "aw_position0_sink_heads_range": [min(r["aw_position0_sink_heads"] for r in rows),
                                          max(r["aw_position0_sink_heads"] for r in rows)],
        "aw_other_positions_sink_heads_max": max(r["aw_other_sink_heads_max"] for r in rows),
        "aw_subject_at_position0": sum(r["prompt"].startswith(r["subject"] or "\0") for r in rows),
        "aw_headline_counts_a_sink": sum(r["aw_headline_counts_a_sink"] for r in rows),
        "aw_headline_head_argmax_is_sink": sum(r["aw_headline_is_sink_head"] for r in rows),
        "aw_old_headline_mostly_sink": sum(r["aw_old_headline_mostly_sink"] for r in rows),
        "aw_summary_mentions_sink": sum(r["aw_summary_mentions_sink"] for r in rows),
        "ep_median_seconds": statistics.median(r["ep_seconds"] for r in rows),
        "aw_median_seconds": statistics.median(r["aw_seconds"] for r in rows),
    }
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "validity_readouts_ep_attn", "model": "smollm2-135m",
                                          "threads": 1, "summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
