"""Consensus across the methods run on one sample: what they agree on, where they disagree, and a
causal check of each localisation (`knowmri.analysis.verification`).

Driven by the findings a result carries, never by its method's name, so a plug-in method takes part
as soon as its findings do: `token_scores` feed the token table (ranks, rank correlations, the share
of importance by token role); `first_top1_layer`, `sites`, `neurons` and `layer_scores` (in that order
of preference, one source per result) the layers each method points at; `neurons` the neurons found
by more than one method; `neurons` and `sites` the causal verification.
"""

from __future__ import annotations

from typing import Any

import torch

from knowmri.analysis.roles import token_roles
from knowmri.analysis.sites import result_sites, site_kind, site_layer
from knowmri.analysis.verification import verification_table, verification_verdict, verify_localisations


def build_consensus(report: Any, model: Any = None, sample: Any = None, verify: bool = True, seed: int = 0) -> dict[str, Any]:
    """What the methods of `report` agree and disagree on (docs/REPORT.md#consensus), with tables and a verdict.

    With a model and the sample, each localisation is also checked causally (unless not `verify`).
    Never raises: a failure becomes `{"error": ...}`, since the consensus must never sink the report.
    """
    try:
        return consensus(report, model, sample, verify, seed)
    except Exception as err:  # consensus must never sink the report
        return {"error": f"{type(err).__name__}: {err}"}


def consensus(report: Any, model: Any = None, sample: Any = None, verify: bool = True, seed: int = 0) -> dict[str, Any]:
    """`build_consensus` without the safety net: errors propagate."""
    ok = {n: r for n, r in report.results.items() if r.status == "ok"}
    out: dict[str, Any] = {"methods": sorted(ok), "tables": []}
    verdict: list[str] = []
    _tokens(ok, model, sample, out, verdict)
    _layers(ok, model, out, verdict)
    _neurons(ok, out, verdict)
    if verify and model is not None and sample is not None and sample.get("prompt"):
        try:
            checked = verify_localisations(ok, model, sample, seed)
        except ValueError as err:
            out["verification"] = {"error": str(err)}
        else:
            if checked is not None:
                out["verification"] = checked
                out["tables"].append(verification_table(checked))
                verdict.append(verification_verdict(checked))
    out["verdict"] = " ".join(verdict) if verdict else "Not enough comparable findings for a consensus."
    return out


def _ranks(x: list[float]) -> torch.Tensor:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    t = torch.tensor(x, dtype=torch.float64)
    values, inverse, counts = torch.unique(t, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank - 1 of each distinct value's first occurrence
    return (first + (counts + 1) / 2).double()[inverse]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the tie-averaged ranks); None where undefined.

    Computed here rather than with scipy.stats, whose import alone takes ~0.5 s of every report."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    rho = float((ra * rb).sum() / (ra.norm() * rb.norm()))
    return None if rho != rho else rho


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
    cats = token_roles(model, sample, n_prompt, split_subject=False) if n_prompt else {}
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
            rho = spearman([abs(scores[a][k]) for k in common], [abs(scores[b][k]) for k in common])
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
    """The layer(s) each result points at, from the first of its findings that says one (see the module doc)."""
    appears: dict[str, Any] = {}
    traced: dict[str, Any] = {}
    located: dict[str, Any] = {}
    scored: dict[str, Any] = {}
    for n, r in ok.items():
        f = r.findings
        if "first_top1_layer" in f:
            if f["first_top1_layer"] is not None:
                appears[f"{n} (answer appears)"] = f["first_top1_layer"]
        elif result_sites(f):
            for site in result_sites(f):
                traced.setdefault(f"{n} {site_kind(site)}", site_layer(site["site"]))
        elif "neurons" in f:
            if f["neurons"]:
                layers = [x["layer"] for x in f["neurons"][:10]]
                located[f"{n} (top-10 neurons, most common layer)"] = max(set(layers), key=layers.count)
        elif f.get("layer_scores"):
            best = max(f["layer_scores"], key=lambda s: float(s["score"]))
            scored[n] = best["layer"]
    peaks = {**appears, **traced, **located, **scored}
    out["peak_layers"] = peaks
    if peaks:
        out["tables"].append({"name": "Layers each method points at", "columns": ["method", "layer"],
                              "rows": [[k, v] for k, v in peaks.items()]})
        values = sorted(peaks.values())
        verdict.append(f"Layers pointed at range over {values[0]}-{values[-1]}"
                       + (f" of {model.n_layers}" if model is not None else "") + ".")


def _neurons(ok: dict, out: dict, verdict: list[str]) -> None:
    """Neurons among the top 20 of more than one result, and how many of each lie near the best traced site."""
    sets = {n: [(x["layer"], x["unit"]) for x in r.findings["neurons"][:20]] for n, r in ok.items() if "neurons" in r.findings}
    owners: dict[tuple[int, int], list[str]] = {}
    for n, s in sets.items():
        for key in s:
            owners.setdefault(key, []).append(n)
    shared = [{"layer": k[0], "unit": k[1], "methods": v} for k, v in sorted(owners.items()) if len(v) > 1]
    out["shared_neurons"] = shared
    traced = next((sites[0] for r in ok.values() if (sites := result_sites(r.findings))), None)
    if traced is not None and sets:
        peak = site_layer(traced["site"])
        window = range(max(0, peak - 2), peak + 3)
        out["neurons_in_tracing_peak"] = {n: sum(1 for l, _ in s if l in window) for n, s in sets.items()}
    if len(sets) > 1:
        names = list(sets)
        by = f"both {names[0]} and {names[1]}" if len(names) == 2 else f"more than one of {', '.join(names[:-1])} and {names[-1]}"
        verdict.append(f"{len(shared)} neuron(s) among the top 20 are found by {by}.")
