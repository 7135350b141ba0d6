"""Consensus across the methods run on one sample: what they agree on, where they disagree, and
a causal check of each localisation (ablate / amplify what a method located, against random)."""

from __future__ import annotations

from typing import Any

import torch

TOKEN_METHODS = ("integrated_gradients", "causal_tracing", "attention_weights", "self_explanation")
NEURON_METHODS = ("knowledge_neurons", "fine")


def _ranks(x: list[float]) -> torch.Tensor:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    t = torch.tensor(x, dtype=torch.float64)
    values, inverse, counts = torch.unique(t, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank - 1 of each distinct value's first occurrence
    return (first + (counts + 1) / 2).double()[inverse]


def _spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the tie-averaged ranks); None where undefined.

    Computed here rather than with scipy.stats, whose import alone takes ~0.5 s of every report."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    rho = float((ra * rb).sum() / (ra.norm() * rb.norm()))
    return None if rho != rho else rho


def token_categories(model: Any, sample: Any, n_prompt: int) -> dict[int, str]:
    """Each prompt position's role: subject, last (the predicting token), first, or relation (the rest)."""
    cats = {i: "relation" for i in range(n_prompt)}
    if n_prompt:
        cats[0] = "first"
    subject = sample.get("triple_subject") if sample is not None else None
    if model is not None and subject and subject in sample.get("prompt", ""):
        span = model.token_span(sample["prompt"], subject)
        for i in span:
            if i < n_prompt:
                cats[i] = "subject"
    if n_prompt:
        cats[n_prompt - 1] = "last"
    return cats


def build_consensus(report: Any, model: Any = None, sample: Any = None, verify: bool = True, seed: int = 0) -> dict[str, Any]:
    """What the methods agree and disagree on (docs/REPORT.md#consensus), with tables and a verdict."""
    ok = {n: r for n, r in report.results.items() if r.status == "ok"}
    out: dict[str, Any] = {"methods": sorted(ok), "tables": []}
    verdict: list[str] = []
    _tokens(ok, model, sample, out, verdict)
    _layers(ok, model, out, verdict)
    _neurons(ok, out, verdict)
    if verify and model is not None and sample is not None and sample.get("prompt"):
        try:
            _verify(ok, model, sample, out, verdict, seed)
        except ValueError as err:
            out["verification"] = {"error": str(err)}
    out["verdict"] = " ".join(verdict) if verdict else "Not enough comparable findings for a consensus."
    return out


def _tokens(ok: dict, model: Any, sample: Any, out: dict, verdict: list[str]) -> None:
    scores = {n: {int(s["index"]): float(s["score"]) for s in ok[n].findings.get("token_scores", [])}
              for n in ok if ok[n].findings.get("token_scores")}
    if not scores:
        return
    texts: dict[int, str] = {}
    for n in scores:
        for s in ok[n].findings["token_scores"]:
            texts.setdefault(int(s["index"]), s.get("token", ""))
    n_prompt = max(max(v) for v in scores.values() if v) + 1 if any(scores.values()) else 0
    cats = token_categories(model, sample, n_prompt) if n_prompt else {}
    tops, shares = {}, {}
    for n, s in scores.items():
        ranked = sorted(s, key=lambda i: -abs(s[i]))
        tops[n] = ranked[:3]
        total = sum(abs(v) for v in s.values()) or 1.0
        share: dict[str, float] = {}
        for i, v in s.items():
            share[cats.get(i, "relation")] = share.get(cats.get(i, "relation"), 0.0) + abs(v) / total
        shares[n] = share
    pairs = []
    names = sorted(scores)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sorted(set(scores[a]) & set(scores[b]))
            rho = _spearman([abs(scores[a][k]) for k in common], [abs(scores[b][k]) for k in common])
            pairs.append({"a": a, "b": b, "spearman": rho, "same_top": tops[a][:1] == tops[b][:1]})
    out["token_top"] = {n: [{"index": i, "token": texts.get(i, "")} for i in t] for n, t in tops.items()}
    out["token_agreement"] = pairs
    out["token_category_share"] = shares
    rows = []
    for i in sorted(texts):
        row = [i, texts[i], cats.get(i, "")]
        for n in names:
            ranked = sorted(scores[n], key=lambda k: -abs(scores[n][k]))
            row.append(ranked.index(i) + 1 if i in scores[n] else "")
        rows.append(row)
    out["tables"].append({"name": "Token importance rank by method (1 = most important)",
                          "columns": ["index", "token", "role", *names], "rows": rows})
    firsts = {n: t[0] for n, t in tops.items() if t}
    if firsts:
        cat_votes = [cats.get(i, "relation") for i in firsts.values()]
        best = max(set(cat_votes), key=cat_votes.count)
        verdict.append(f"{cat_votes.count(best)} of {len(firsts)} token methods put a {best} token first"
                       + (f" ({', '.join(n for n, i in firsts.items() if cats.get(i) == best)})." if len(firsts) > 1 else "."))
        disagree = [p for p in pairs if p["spearman"] is not None and p["spearman"] < 0.2]
        if disagree:
            verdict.append("They disagree on the full ranking: " + ", ".join(
                f"{p['a']} vs {p['b']} (rho {p['spearman']:.2f})" for p in disagree) + ".")


def _layers(ok: dict, model: Any, out: dict, verdict: list[str]) -> None:
    peaks: dict[str, Any] = {}
    if "logit_lens" in ok and ok["logit_lens"].findings.get("first_top1_layer") is not None:
        peaks["logit_lens (answer appears)"] = ok["logit_lens"].findings["first_top1_layer"]
    ct = ok.get("causal_tracing")
    if ct is not None:
        for kind in ("mlp", "attn", "hidden"):
            peak = (ct.findings.get("peaks") or {}).get(kind) or ct.findings.get(f"peak_{kind}")
            if isinstance(peak, dict) and "layer" in peak:
                peaks[f"causal_tracing {kind}"] = peak["layer"]
    for n in NEURON_METHODS:
        if n in ok and ok[n].findings.get("neurons"):
            layers = [x["layer"] for x in ok[n].findings["neurons"][:10]]
            peaks[f"{n} (top-10 neurons, most common layer)"] = max(set(layers), key=layers.count)
    for n, r in ok.items():
        if n not in ("logit_lens", "causal_tracing", *NEURON_METHODS) and r.findings.get("layer_scores"):
            best = max(r.findings["layer_scores"], key=lambda s: float(s["score"]))
            peaks[n] = best["layer"]
    out["peak_layers"] = peaks
    if peaks:
        out["tables"].append({"name": "Layers each method points at", "columns": ["method", "layer"],
                              "rows": [[k, v] for k, v in peaks.items()]})
        values = sorted(peaks.values())
        verdict.append(f"Layers pointed at range over {values[0]}-{values[-1]}"
                       + (f" of {model.n_layers}" if model is not None else "") + ".")


def _neurons(ok: dict, out: dict, verdict: list[str]) -> None:
    sets = {n: [(x["layer"], x["unit"]) for x in ok[n].findings.get("neurons", [])[:20]] for n in NEURON_METHODS if n in ok}
    owners: dict[tuple[int, int], list[str]] = {}
    for n, s in sets.items():
        for key in s:
            owners.setdefault(key, []).append(n)
    shared = [{"layer": k[0], "unit": k[1], "methods": v} for k, v in sorted(owners.items()) if len(v) > 1]
    out["shared_neurons"] = shared
    ct = ok.get("causal_tracing")
    if ct is not None and sets:
        mlp_peak = ((ct.findings.get("peaks") or {}).get("mlp") or {}).get("layer")
        if mlp_peak is not None:
            window = range(max(0, mlp_peak - 2), mlp_peak + 3)
            out["neurons_in_tracing_peak"] = {n: sum(1 for l, _ in s if l in window) for n, s in sets.items()}
    if len(sets) > 1:
        verdict.append(f"{len(shared)} neuron(s) among the top 20 are found by both knowledge_neurons and fine.")


@torch.inference_mode()
def _p_answers(model: Any, enc: Any, variants: list[list[tuple[str, dict]]], batch: int = 32) -> list[float]:
    """P(answer) under each variant's edits, the variants as rows of a few batched forwards."""
    from knowmri.hooks import Hooks
    from knowmri.methods.common import answer_prob

    out: list[float] = []
    for start in range(0, len(variants), batch):
        chunk = variants[start:start + batch]
        with Hooks(model) as h:
            for row, edits in enumerate(chunk):
                for name, kwargs in edits:
                    kwargs = dict(kwargs)
                    how = kwargs.pop("how")
                    getattr(h, how)(name, rows=[row], **kwargs)
            logits = model.forward(**enc.inputs(len(chunk)))
        out += [float(p) for p in answer_prob(logits, enc)]
    return out


def _neuron_edits(neurons: list[tuple[int, int]], how: str, factor: float = 2.0) -> list[tuple[str, dict]]:
    by_layer: dict[int, list[int]] = {}
    for layer, unit in neurons:
        by_layer.setdefault(layer, []).append(unit)
    edits = []
    for layer, units in by_layer.items():
        kw: dict[str, Any] = {"how": "ablate" if how == "ablate" else "scale", "units": units}
        if how != "ablate":
            kw["factor"] = factor
        edits.append((f"blocks.{layer}.mlp.neurons", kw))
    return edits


def _verify(ok: dict, model: Any, sample: Any, out: dict, verdict: list[str], seed: int, k: int = 5, draws: int = 5) -> None:
    """Ablate and amplify each method's located neurons / layers; compare with random ones of the same size."""
    from knowmri.methods.common import prepare

    prep = prepare(model, sample)
    enc = prep.enc
    gen = torch.Generator().manual_seed(seed)
    rows, checks = [], {}

    def random_neurons(layers: list[int]) -> list[tuple[int, int]]:
        return [(layer, int(torch.randint(model.d_mlp, (1,), generator=gen))) for layer in layers]

    variants: list[list[tuple[str, dict]]] = [[]]  # row 0: no edit
    plans: dict[str, tuple[str, int]] = {}  # method -> (what was located, first row of its 2 + draws variants)
    for n in NEURON_METHODS:
        if n not in ok or not ok[n].findings.get("neurons"):
            continue
        located = [(x["layer"], x["unit"]) for x in ok[n].findings["neurons"][:k]]
        plans[n] = (f"top {len(located)} neurons", len(variants))
        variants += [_neuron_edits(located, "ablate"), _neuron_edits(located, "amplify")]
        variants += [_neuron_edits(random_neurons([l for l, _ in located]), "ablate") for _ in range(draws)]
    ct = ok.get("causal_tracing")
    peak = ((ct.findings.get("peaks") or {}).get("mlp") if ct is not None else None) or None
    if isinstance(peak, dict) and "layer" in peak and "token" in peak:
        layer, token = int(peak["layer"]), int(peak["token"])
        plans["causal_tracing"] = (f"MLP output of layer {layer} at token {token}", len(variants))
        variants += [[(f"blocks.{layer}.mlp.out", {"how": "ablate", "positions": [token]})],
                     [(f"blocks.{layer}.mlp.out", {"how": "scale", "factor": 2.0, "positions": [token]})]]
        for _ in range(draws):
            units = torch.randperm(model.d_mlp, generator=gen)[: max(1, model.d_mlp // 20)].tolist()
            variants.append([(f"blocks.{layer}.mlp.neurons", {"how": "ablate", "units": units, "positions": [token]})])
    if not plans:
        return
    probs = _p_answers(model, enc, variants)
    base = probs[0]
    for n, (what, i) in plans.items():
        rand = probs[i + 2:i + 2 + draws]
        checks[n] = _judge(base, probs[i], probs[i + 1], sum(rand) / len(rand), what)
    if not checks:
        return
    out["verification"] = {"base_prob": base, "methods": checks}
    for n, c in checks.items():
        rows.append([n, c["located"], round(base, 4), round(c["ablated"], 4), round(c["amplified"], 4), round(c["random_ablated"], 4),
                     "yes" if c["holds"] else "NO"])
    out["tables"].append({"name": "Causal verification: P(answer) when the located units are ablated / amplified (x2)",
                          "columns": ["method", "located", "P clean", "P ablated", "P amplified", "P random ablated", "holds up"],
                          "rows": rows})
    weak = [n for n, c in checks.items() if not c["holds"]]
    verdict.append("Causal check: " + ", ".join(f"{n} {c['drop']:+.0%}" for n, c in checks.items()) + " change when ablated"
                    + (f"; the localisation of {', '.join(weak)} does not hold up (no larger effect than random)." if weak else
                       "; every localisation beats random."))


def _judge(base: float, ablated: float, amplified: float, random_ablated: float, what: str) -> dict[str, Any]:
    drop = (ablated - base) / base if base > 0 else 0.0
    random_drop = (random_ablated - base) / base if base > 0 else 0.0
    holds = (base - ablated) > max(2 * (base - random_ablated), 0.02 * base)
    return {"located": what, "ablated": ablated, "amplified": amplified, "random_ablated": random_ablated,
            "drop": drop, "random_drop": random_drop, "holds": bool(holds)}
