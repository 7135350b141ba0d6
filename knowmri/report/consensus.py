"""Consensus across methods on one sample: token, layer and neuron agreement."""

from __future__ import annotations

from typing import Any


def _ranking(scores: list[dict[str, Any]]) -> list[int]:
    return [s["index"] for s in sorted(scores, key=lambda s: -float(s["score"]))]


def build_consensus(report: Any, model: Any = None, sample: Any = None) -> dict[str, Any]:
    """What the methods agree and disagree on (SPEC §5 `consensus`)."""
    from scipy.stats import spearmanr

    ok = {n: r for n, r in report.results.items() if r.status == "ok"}
    token = {n: r.findings["token_scores"] for n, r in ok.items() if r.findings.get("token_scores")}
    out: dict[str, Any] = {"methods": sorted(ok)}
    tops = {n: _ranking(s)[:3] for n, s in token.items()}
    out["token_top"] = tops
    pairs = []
    names = sorted(token)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa = {s["index"]: float(s["score"]) for s in token[a]}
            sb = {s["index"]: float(s["score"]) for s in token[b]}
            common = sorted(set(sa) & set(sb))
            if len(common) >= 3:
                rho = spearmanr([sa[k] for k in common], [sb[k] for k in common]).statistic
                pairs.append({"a": a, "b": b, "spearman": None if rho != rho else float(rho)})
    out["token_agreement"] = pairs
    layers = {}
    for n, r in ok.items():
        ls = r.findings.get("layer_scores")
        if ls:
            best = max(ls, key=lambda s: float(s["score"]))
            layers[n] = best["layer"]
    out["peak_layers"] = layers
    neuron_sets = {n: {(x["layer"], x["unit"]) for x in r.findings.get("neurons", [])[:20]} for n, r in ok.items()
                   if r.findings.get("neurons")}
    shared: dict[tuple[int, int], list[str]] = {}
    for n, s in neuron_sets.items():
        for key in s:
            shared.setdefault(key, []).append(n)
    out["shared_neurons"] = [{"layer": k[0], "unit": k[1], "methods": v} for k, v in sorted(shared.items()) if len(v) > 1]
    verdict = []
    if tops:
        firsts = {n: t[0] for n, t in tops.items() if t}
        common = max(set(firsts.values()), key=list(firsts.values()).count)
        agree = [n for n, t in firsts.items() if t == common]
        verdict.append(f"{len(agree)} of {len(firsts)} token methods rank token {common} most important")
    if layers:
        verdict.append("peak layers: " + ", ".join(f"{n} {l}" for n, l in layers.items()))
    out["verdict"] = "; ".join(verdict)
    return out
