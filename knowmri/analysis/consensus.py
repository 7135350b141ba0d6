"""Consensus across the methods run on one sample: what they agree on, where they disagree, and a
causal check of each localisation (`knowmri.analysis.verification`).

Driven by the findings a result carries, never by its method's name, so a plug-in method takes part
as soon as its findings do: `token_scores` feed the token table (ranks, rank correlations, the share
of importance by token role); `first_top1_layer`, `sites`, `neurons` and `layer_scores` (in that order
of preference, one source per result) the layers each method points at; `neurons` the neurons found
by more than one method; `neurons` and `sites` the causal verification.

Only real findings enter the layer, neuron and verification tables: a result whose `holds` is False
(it found nothing, or its finding failed its own control) points at no layer, site or neuron; a
`first_top1_layer` of None points at none (the answer never became top-1); `generic` neurons (active
whatever the fact) are left out; `layer_scores` count only where some layer scores above 0. Each
layer row carries its evidence: the site's effect and interval, the layer's score (and interval), the
neurons' share of the top 10, the method's own warnings, and the causal verification's verdict.
"""

from __future__ import annotations

import copy
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
    found = {n: r for n, r in ok.items() if r.findings.get("holds") is not False}
    out: dict[str, Any] = {"methods": sorted(ok), "tables": []}
    if len(found) < len(ok):
        out["found_nothing"] = sorted(set(ok) - set(found))
    verdict: list[str] = []
    _tokens(ok, model, sample, out, verdict)
    layer_rows = _layers(found, model, out, verdict)
    _neurons(found, out, verdict)
    if verify and model is not None and sample is not None and sample.get("prompt"):
        try:
            checked = verify_localisations(_located(found), model, sample, seed)
        except ValueError as err:
            out["verification"] = {"error": str(err)}
        else:
            if checked is not None:
                out["verification"] = checked
                out["tables"].append(verification_table(checked))
                verdict.append(verification_verdict(checked))
                _add_verdicts(layer_rows, out, checked)
    if out.get("found_nothing"):
        verdict.append("Found nothing to point at (no layer, site or neuron listed): "
                       + ", ".join(out["found_nothing"]) + ".")
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


def _located(results: dict) -> dict:
    """The results with their generic neurons left out (shallow copies; the report is not changed)."""
    out = {}
    for n, r in results.items():
        neurons = r.findings.get("neurons")
        if neurons and any(isinstance(x, dict) and x.get("generic") for x in neurons):
            r = copy.copy(r)
            r.findings = {**r.findings, "neurons": specific_neurons(r.findings)}
        out[n] = r
    return out


def specific_neurons(findings: dict[str, Any]) -> list[dict[str, Any]]:
    """`findings["neurons"]` without the generic ones (active whatever the fact)."""
    return [x for x in findings.get("neurons") or [] if not (isinstance(x, dict) and x.get("generic"))]


def _warned(f: dict[str, Any]) -> str:
    n = len(f.get("warnings") or [])
    return f"; {n} warning{'s' if n > 1 else ''}" if n else ""


def _layers(ok: dict, model: Any, out: dict, verdict: list[str]) -> list[tuple[list[Any], str, int]]:
    """The layer(s) each result points at, from the first of its findings that says one (see the module doc),
    each with its evidence; returns each table row with its result's name and source (1: a site)."""
    rows: list[tuple[int, str, str, int, str]] = []  # (source order, method, label, layer, evidence)
    for n, r in ok.items():
        f = r.findings
        if "first_top1_layer" in f:
            layer = f["first_top1_layer"]
            if layer is not None:
                scores = {int(s["layer"]): float(s["score"]) for s in f.get("layer_scores") or []}
                there = f", layer score {scores[layer]:.3g}" if layer in scores else ""
                rows.append((0, n, f"{n} (answer appears)", layer, f"answer top-1 from this layer on{there}{_warned(f)}"))
        elif result_sites(f):
            seen = set()
            for site in result_sites(f):
                label = f"{n} {site_kind(site)}"
                if label not in seen:
                    seen.add(label)
                    rows.append((1, n, label, site_layer(site["site"]), _site_evidence(site) + _warned(f)))
        elif "neurons" in f:
            neurons = specific_neurons(f)
            if neurons:
                layers = [x["layer"] for x in neurons[:10]]
                best = max(set(layers), key=layers.count)
                generic = len(f["neurons"]) - len(neurons)
                rows.append((2, n, f"{n} (top-10 neurons, most common layer)", best,
                             f"{layers.count(best)} of the top {len(layers)} neurons"
                             + (f" ({generic} generic neurons left out)" if generic else "") + _warned(f)))
        elif f.get("layer_scores"):
            best = max(f["layer_scores"], key=lambda s: float(s["score"]))
            if float(best["score"]) > 0:
                rows.append((3, n, n, best["layer"], _score_evidence(f["layer_scores"], best) + _warned(f)))
    rows.sort(key=lambda row: row[0])
    peaks = {label: layer for _, _, label, layer, _ in rows}
    out["peak_layers"] = peaks
    out["peak_evidence"] = {label: evidence for _, _, label, _, evidence in rows}
    if not peaks:
        return []
    table = {"name": "Layers each method points at", "columns": ["method", "layer", "evidence"],
             "rows": [[label, layer, evidence] for _, _, label, layer, evidence in rows]}
    out["tables"].append(table)
    values = sorted(peaks.values())
    verdict.append(f"Layers pointed at range over {values[0]}-{values[-1]}"
                   + (f" of {model.n_layers}" if model is not None else "") + ".")
    return [(row, n, source) for row, (source, n, *_) in zip(table["rows"], rows)]


def _site_evidence(site: dict[str, Any]) -> str:
    ci = site.get("ci")
    text = f"effect {float(site['score']):.3g}"
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" (95% CI {float(ci[0]):.3g} to {float(ci[1]):.3g})"
    if site.get("window"):
        text += f", window {site['window']} layers"
    return text


def _score_evidence(scores: list[dict[str, Any]], best: dict[str, Any]) -> str:
    others = sorted((float(s["score"]) for s in scores if s is not best), reverse=True)
    text = f"layer score {float(best['score']):.3g}"
    ci = best.get("ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" (95% CI {float(ci[0]):.3g} to {float(ci[1]):.3g})"
    return text + (f", next best {others[0]:.3g}" if others else "")


def _add_verdicts(rows: list[tuple[list[Any], str, int]], out: dict, checked: dict[str, Any]) -> None:
    """Append the causal verification's verdict to the evidence of each verified method's layer rows."""
    for row, n, source in rows:
        check = (checked["methods"].get(f"{n} site") if source == 1 else None) or checked["methods"].get(n)
        if check is not None:
            row[2] += f"; causal check {'holds' if check['holds'] else 'fails'} ({check['drop']:+.0%} when ablated)"
            out["peak_evidence"][row[0]] = row[2]


def _neurons(ok: dict, out: dict, verdict: list[str]) -> None:
    """Neurons among the top 20 of more than one result, and how many of each lie near the best traced site."""
    sets = {n: [(x["layer"], x["unit"], -1 if x.get("expert") is None else x["expert"])
                for x in specific_neurons(r.findings)[:20]] for n, r in ok.items() if specific_neurons(r.findings)}
    owners: dict[tuple[int, int, int], list[str]] = {}  # (layer, unit, expert or -1)
    for n, s in sets.items():
        for key in s:
            owners.setdefault(key, []).append(n)
    shared = [{"layer": k[0], **({"expert": k[2]} if k[2] >= 0 else {}), "unit": k[1], "methods": v}
              for k, v in sorted(owners.items()) if len(v) > 1]
    out["shared_neurons"] = shared
    traced = next((sites[0] for r in ok.values() if (sites := result_sites(r.findings))), None)
    if traced is not None and sets:
        peak = site_layer(traced["site"])
        window = range(max(0, peak - 2), peak + 3)
        out["neurons_in_tracing_peak"] = {n: sum(1 for l, *_ in s if l in window) for n, s in sets.items()}
    if len(sets) > 1:
        names = list(sets)
        by = f"both {names[0]} and {names[1]}" if len(names) == 2 else f"more than one of {', '.join(names[:-1])} and {names[-1]}"
        verdict.append(f"{len(shared)} neuron(s) among the top 20 are found by {by}.")
