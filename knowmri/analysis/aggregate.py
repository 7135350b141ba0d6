"""Dataset-level diagnosis: aggregate per-sample method results into one report.

Token importance is pooled by role (ROME's token categories, `knowmri.analysis.roles`); per-layer
scores are averaged; the effect grids behind a result's `sites` (a [token][layer] grid under each
site's `kind`, e.g. causal tracing's `mlp`, with `low_score` as its baseline) are averaged per role and
layer; neurons are counted by how many samples located them. Like the consensus, it reads the
findings a result carries, never its method's name.

Every mean over the samples carries its 95% confidence interval (`knowmri.stats`): a t-interval for
shares, per-token importance, layer scores, grid cells and neuron scores, Wilson's interval for how
often a role is the top token and how often a neuron is located (frequencies out of the samples run).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np

from knowmri.analysis.roles import ROLES, pooled_role, token_roles
from knowmri.report import figures
from knowmri.report.result import MethodResult
from knowmri.stats import LEVEL, mean_ci, mean_ci_columns, proportion_ci

_CI = f"{LEVEL:.0%} CI"


def _interval(values: list[float]) -> list[float]:
    """[low, high] of the mean of `values`, rounded for the tables."""
    _, low, high = mean_ci(values)
    return [low, high]


def _show(ci: list[float], digits: int = 4) -> str:
    return f"{ci[0]:.{digits}f} to {ci[1]:.{digits}f}"


class Aggregator:
    """Streams per-sample results of each method and reduces them once at the end."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.n = 0
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.role_share: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.subject_share: dict[str, list[float]] = defaultdict(list)
        self.role_per_token: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.top_role: dict[str, Counter] = defaultdict(Counter)
        self.layer_scores: dict[str, list[np.ndarray]] = defaultdict(list)
        self.grids: dict[str, dict[str, dict[str, list[np.ndarray]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list)))  # method -> kind -> role -> [layer] rows
        self.neurons: dict[str, Counter] = defaultdict(Counter)
        self.neuron_score: dict[str, dict[tuple[int, int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
        self.ran: Counter = Counter()  # per method: samples whose result is ok (the frequencies' denominator)
        self.records: list[dict[str, Any]] = []

    def add(self, index: int, sample: Any, results: dict[str, MethodResult], extra: dict[str, Any] | None = None) -> None:
        """Reduce one sample's results; `extra` joins the sample's row of the per-sample table."""
        self.n += 1
        self.records.append({"index": index, "prompt": sample.get("prompt"), "ground_truth": sample.get("ground_truth"),
                             "status": {n: r.status for n, r in results.items()},
                             "summary": {n: r.summary for n, r in results.items() if r.status == "ok"},
                             "seconds": round(sum(r.seconds for r in results.values()), 4), **(extra or {})})
        for name, r in results.items():
            self.status[name][r.status] += 1
            self.seconds[name].append(r.seconds)
            if r.status != "ok":
                continue
            self.ran[name] += 1
            f = r.findings
            if f.get("token_scores"):
                self._tokens(name, sample, f["token_scores"])
            if f.get("layer_scores"):
                ls = np.zeros(self.model.n_layers)
                for s in f["layer_scores"]:
                    if 0 <= int(s["layer"]) < len(ls):
                        ls[int(s["layer"])] = float(s["score"])
                self.layer_scores[name].append(ls)
            kinds = {s.get("kind") for s in f.get("sites") or [] if isinstance(s, dict)}
            for kind, grid in f.items():
                if kind in kinds and grid:
                    self._grid(name, kind, sample, np.asarray(grid, dtype=float), float(f.get("low_score", 0.0)))
            for x in f.get("neurons", [])[:20]:
                k = (int(x["layer"]), int(x["unit"]), -1 if x.get("expert") is None else int(x["expert"]))
                self.neurons[name][k] += 1
                self.neuron_score[name][k].append(float(x["score"]))

    def add_saved(self, data: dict[str, Any], **extra: Any) -> None:
        """Reduce one sample's saved report (report.json's structure with the sample's `index`).

        Adding the saved reports of a dataset in sample order rebuilds the aggregate exactly, however
        (and in how many processes, or sessions) the samples were run."""
        results = {name: MethodResult.from_dict(r) for name, r in (data.get("results") or {}).items()}
        self.add(int(data["index"]), data.get("sample") or {}, results, extra)

    def _tokens(self, name: str, sample: Any, scores: list[dict]) -> None:
        n_prompt = max(int(s["index"]) for s in scores) + 1
        roles = token_roles(self.model, sample, n_prompt)
        total = sum(abs(float(s["score"])) for s in scores) or 1.0
        share = Counter()
        for s in scores:
            share[roles.get(int(s["index"]), "relation")] += abs(float(s["score"])) / total
        for role in ROLES:
            self.role_share[name][role].append(share.get(role, 0.0))
        self.subject_share[name].append(sum(v for k, v in share.items() if k.startswith("subject")))
        mean_all = total / len(scores)
        by_role: dict[str, list[float]] = defaultdict(list)
        for s in scores:
            by_role[roles.get(int(s["index"]), "relation")].append(abs(float(s["score"])))
        for role in ROLES:  # pooled like the consensus: "subject", "relation" (the tokens after the subject)
            if role in by_role and pooled_role(role) != role:
                by_role.setdefault(pooled_role(role), []).extend(by_role[role])
        for role, values in by_role.items():
            if values:
                self.role_per_token[name][role].append(float(np.mean(values)) / mean_all)
        best = max(scores, key=lambda s: abs(float(s["score"])))
        self.top_role[name][roles.get(int(best["index"]), "relation")] += 1

    def _grid(self, name: str, kind: str, sample: Any, grid: np.ndarray, low: float) -> None:
        roles = token_roles(self.model, sample, grid.shape[0])
        for role in ROLES:
            rows = [i for i in range(grid.shape[0]) if roles.get(i) == role]
            if rows:
                self.grids[name][kind][role].append(grid[rows].mean(0) - low)

    def report(self, report: Any) -> None:
        """Fill `report.results` with one aggregated result per method."""
        for name in self.status:
            r = MethodResult(method=name, path=[], status="ok" if self.status[name].get("ok") else "error")
            r.seconds = float(np.sum(self.seconds[name]))
            counts = dict(self.status[name])
            r.findings["status_counts"] = counts
            r.findings["ci_level"] = LEVEL
            parts = [f"{counts.get('ok', 0)} of {self.n} samples ran"]
            if name in self.role_share:
                parts.append(self._report_tokens(name, r))
            if name in self.layer_scores:
                parts.append(self._report_layers(name, r))
            if name in self.grids:
                self._report_grids(name, r)
            if name in self.neurons:
                parts.append(self._report_neurons(name, r))
            r.summary = "; ".join(parts) + "."
            report.results[name] = r
        report.meta["samples"] = self.records
        report.meta["n_samples"] = self.n

    def _report_tokens(self, name: str, r: MethodResult) -> str:
        shares = self.role_share[name]
        means = {role: float(np.mean(v)) for role, v in shares.items()}
        share_ci = {role: _interval(v) for role, v in shares.items()}
        subject, subject_ci = float(np.mean(self.subject_share[name])), _interval(self.subject_share[name])
        per_token = {role: float(np.mean(v)) for role, v in self.role_per_token[name].items()}
        per_token_ci = {role: _interval(v) for role, v in self.role_per_token[name].items()}
        tops, n_top = self.top_role[name], sum(self.top_role[name].values())
        r.findings.update({
            "role_share": means, "role_share_ci": share_ci, "subject_share": subject, "subject_share_ci": subject_ci,
            "top_role_counts": dict(tops), "top_role_ci": {k: list(proportion_ci(c, n_top)) for k, c in tops.items()},
            "role_per_token": per_token, "role_per_token_ci": per_token_ci, "token_scores": []})
        top = tops.most_common(1)[0]
        fig = figures.bars(list(means), list(means.values()), title=f"{name}: mean share of token importance by role "
                           f"({_CI})", x_title="role", y_title="share")
        fig["data"][0]["error_y"] = {"type": "data", "symmetric": False,
                                     "array": [share_ci[k][1] - means[k] for k in means],
                                     "arrayminus": [means[k] - share_ci[k][0] for k in means]}
        r.add_figure("Importance share by token role", fig)
        r.add_table("Importance by token role", ["role", "mean share", f"share {_CI}", "per token (x mean token)",
                                                 f"per token {_CI}", "top token in # samples"],
                    [[k, round(v, 4), _show(share_ci[k]), round(per_token.get(k, 0.0), 3),
                      _show(per_token_ci[k], 3) if k in per_token_ci else "", tops.get(k, 0)] for k, v in means.items()])
        return (f"subject tokens hold {subject:.0%} ({_CI} {subject_ci[0]:.0%} to {subject_ci[1]:.0%}) of the importance "
                f"on average, {per_token.get('subject', 0.0):.2f}x the mean token's importance per token "
                f"(relation {per_token.get('relation', 0.0):.2f}x, last {per_token.get('last', 0.0):.2f}x); the top "
                f"token is a {top[0].replace('_', ' ')} token in {top[1]} of {n_top} samples")

    def _report_layers(self, name: str, r: MethodResult) -> str:
        rows = self.layer_scores[name]
        mean, low, high = mean_ci_columns(rows)
        r.findings["layer_scores"] = [{"layer": i, "score": float(v), "ci": [float(a), float(b)]}
                                      for i, (v, a, b) in enumerate(zip(mean, low, high))]
        best = int(mean.argmax())
        r.add_figure("Mean layer score", figures.lines(
            list(range(len(mean))), {name: mean.tolist(), f"{_CI} low": low.tolist(), f"{_CI} high": high.tolist()},
            title=f"{name}: mean over {len(rows)} samples, with its {_CI}", x_title="layer", y_title="score"))
        r.add_table("Mean layer score", ["layer", "mean score", _CI],
                    [[i, round(float(v), 5), _show([float(a), float(b)], 5)]
                     for i, (v, a, b) in enumerate(zip(mean, low, high))])
        return f"mean layer score peaks at layer {best} ({mean[best]:.3g}, {_CI} {low[best]:.3g} to {high[best]:.3g})"

    def _report_grids(self, name: str, r: MethodResult) -> None:
        for kind, by_role in self.grids[name].items():
            roles = [role for role in ROLES if by_role.get(role)]
            stats = {role: mean_ci_columns(by_role[role]) for role in roles}
            z = [stats[role][0].tolist() for role in roles]
            r.findings[f"{kind}_by_role"] = dict(zip(roles, z))
            r.findings[f"{kind}_by_role_ci"] = {role: {"low": stats[role][1].tolist(), "high": stats[role][2].tolist(),
                                                       "n": len(by_role[role])} for role in roles}
            fig = figures.heatmap(
                z, x=list(range(len(z[0]))), y=roles, title=f"Average indirect effect of restoring {kind} states",
                x_title="layer", y_title="token role", colorscale={"mlp": "Greens", "attn": "Reds"}.get(kind, "Purples"))
            fig["data"][0]["customdata"] = [[[float(a), float(b)] for a, b in zip(stats[role][1], stats[role][2])]
                                            for role in roles]
            fig["data"][0]["hovertemplate"] = ("layer: %{x}<br>token role: %{y}<br>mean: %{z:.4g}<br>"
                                               f"{_CI}: %{{customdata[0]:.3g}} to %{{customdata[1]:.3g}}<extra></extra>")
            r.add_figure(f"Average indirect effect ({kind})", fig)
            peaks = []
            for role in roles:
                mean, low, high = stats[role]
                best = int(mean.argmax())
                peaks.append([role, len(by_role[role]), best, round(float(mean[best]), 5),
                              _show([float(low[best]), float(high[best])], 5)])
            r.add_table(f"Average indirect effect ({kind}): each role's peak layer",
                        ["role", "samples", "peak layer", "mean effect", _CI], peaks)

    def _report_neurons(self, name: str, r: MethodResult) -> str:
        freq, n = self.neurons[name].most_common(20), max(self.ran[name], 1)
        found = []
        for k, c in freq:
            scores = self.neuron_score[name][k]
            found.append({"layer": k[0], **({"expert": k[2]} if k[2] >= 0 else {}), "unit": k[1], "score": float(np.mean(scores)), "count": c,
                          "score_ci": _interval(scores), "frequency": c / n, "frequency_ci": list(proportion_ci(c, n))})
        r.findings["neurons"] = found
        r.add_table("Most frequently located neurons", ["layer", "unit", "samples", f"frequency ({_CI})", "mean score",
                                                        f"score {_CI}"],
                    [[x["layer"], x["unit"] if "expert" not in x else f"E{x['expert']}.U{x['unit']}", x["count"], f"{x['frequency']:.2f} ({_show(x['frequency_ci'], 2)})",
                      round(x["score"], 5), _show(x["score_ci"], 5)] for x in found])
        return f"{sum(1 for _, c in freq if c > 1)} neurons recur in more than one sample"
