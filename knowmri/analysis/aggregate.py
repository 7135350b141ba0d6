"""Dataset-level diagnosis: aggregate per-sample method results into one report.

Token importance is pooled by role (ROME's token categories, `knowmri.analysis.roles`); per-layer
scores are averaged; the effect grids behind a result's `sites` (a [token][layer] grid under each
site's `kind`, e.g. causal tracing's `mlp`, with `low_score` as its baseline) are averaged per role and
layer; neurons are counted by how many samples located them. Like the consensus, it reads the
findings a result carries, never its method's name.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np

from knowmri.analysis.roles import ROLES, token_roles
from knowmri.report import figures
from knowmri.report.result import MethodResult


class Aggregator:
    """Streams per-sample results of each method and reduces them once at the end."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.n = 0
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.role_share: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.role_per_token: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.top_role: dict[str, Counter] = defaultdict(Counter)
        self.layer_scores: dict[str, list[np.ndarray]] = defaultdict(list)
        self.grids: dict[str, dict[str, dict[str, list[np.ndarray]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list)))  # method -> kind -> role -> [layer] rows
        self.neurons: dict[str, Counter] = defaultdict(Counter)
        self.neuron_score: dict[str, dict[tuple[int, int], float]] = defaultdict(lambda: defaultdict(float))
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
                k = (int(x["layer"]), int(x["unit"]))
                self.neurons[name][k] += 1
                self.neuron_score[name][k] += float(x["score"])

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
        mean_all = total / len(scores)
        by_role: dict[str, list[float]] = defaultdict(list)
        for s in scores:
            by_role[roles.get(int(s["index"]), "relation")].append(abs(float(s["score"])))
        by_role["subject"] = [v for k in ROLES if k.startswith("subject") for v in by_role.get(k, [])]
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
            parts = [f"{counts.get('ok', 0)} of {self.n} samples ran"]
            if name in self.role_share:
                means = {role: float(np.mean(v)) for role, v in self.role_share[name].items()}
                subject = sum(means.get(k, 0.0) for k in ROLES if k.startswith("subject"))
                r.findings["role_share"] = means
                r.findings["subject_share"] = subject
                r.findings["top_role_counts"] = dict(self.top_role[name])
                per_token = {role: float(np.mean(v)) for role, v in self.role_per_token[name].items()}
                r.findings["role_per_token"] = per_token
                r.findings["token_scores"] = []
                top = self.top_role[name].most_common(1)[0]
                parts.append(f"subject tokens hold {subject:.0%} of the importance on average, "
                             f"{per_token.get('subject', 0.0):.2f}x the mean token's importance per token "
                             f"(relation {per_token.get('relation', 0.0):.2f}x, last {per_token.get('last', 0.0):.2f}x); the top token is a "
                             f"{top[0].replace('_', ' ')} token in {top[1]} of {sum(self.top_role[name].values())} samples")
                r.add_figure("Importance share by token role", figures.bars(list(means), list(means.values()),
                             title=f"{name}: mean share of token importance by role", x_title="role", y_title="share"))
                r.add_table("Importance by token role", ["role", "mean share", "per token (x mean token)", "top token in # samples"],
                            [[k, round(v, 4), round(per_token.get(k, 0.0), 3), self.top_role[name].get(k, 0)] for k, v in means.items()])
            if name in self.layer_scores:
                mean = np.mean(self.layer_scores[name], axis=0)
                r.findings["layer_scores"] = [{"layer": i, "score": float(v)} for i, v in enumerate(mean)]
                parts.append(f"mean layer score peaks at layer {int(mean.argmax())}")
                r.add_figure("Mean layer score", figures.lines(list(range(len(mean))), {name: mean.tolist()},
                             title=f"{name}: mean over {len(self.layer_scores[name])} samples", x_title="layer", y_title="score"))
            if name in self.grids:
                for kind, by_role in self.grids[name].items():
                    roles = [role for role in ROLES if by_role.get(role)]
                    z = [np.mean(by_role[role], axis=0).tolist() for role in roles]
                    r.findings[f"{kind}_by_role"] = dict(zip(roles, z))
                    r.add_figure(f"Average indirect effect ({kind})", figures.heatmap(
                        z, x=list(range(len(z[0]))), y=roles, title=f"Average indirect effect of restoring {kind} states",
                        x_title="layer", y_title="token role", colorscale={"mlp": "Greens", "attn": "Reds"}.get(kind, "Purples")))
            if name in self.neurons:
                freq = self.neurons[name].most_common(20)
                r.findings["neurons"] = [{"layer": k[0], "unit": k[1], "score": self.neuron_score[name][k] / c, "count": c}
                                         for k, c in freq]
                parts.append(f"{sum(1 for _, c in freq if c > 1)} neurons recur in more than one sample")
                r.add_table("Most frequently located neurons", ["layer", "unit", "samples", "mean score"],
                            [[k[0], k[1], c, round(self.neuron_score[name][k] / c, 5)] for k, c in freq])
            r.summary = "; ".join(parts) + "."
            report.results[name] = r
        report.meta["samples"] = self.records
        report.meta["n_samples"] = self.n
