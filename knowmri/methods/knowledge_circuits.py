"""Knowledge circuits (Yao et al. 2024): the subgraph of attention heads and MLPs that carries a
fact from the subject to the answer, found with edge attribution patching (EAP, Syed et al.
2023) or its integrated-gradients variant (EAP-IG, Hanna et al. 2024); see `circuits_engine`.

The prompt is corrupted by a counterfactual subject whose answer is a real alternative object
(`circuits_corruption`), the edges are scored once, and the circuit is the smallest one whose own
run recovers a target share of the metric (`circuits_search`), unless `top_n` fixes its size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.data.relations import counterfactual_subjects, relation_id_of
from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.circuits_corruption import SUBJECTS, Candidate, Corruption, counterfactual, first_token, noise
from knowmri.methods.circuits_engine import edge_attribution
from knowmri.methods.circuits_search import Evaluator, Search, circuit_mask, edge_list, ranked_edges, search
from knowmri.methods.common import prepare
from knowmri.models.attention import uses_short_attention
from knowmri.sample import Sample

#: The chosen circuit is called unfaithful below this share of the metric recovered.
UNFAITHFUL = 0.5
#: Edges drawn in the circuit graph and listed in its table (all are in the findings).
SHOWN = 200


@dataclass
class KnowledgeCircuitsParams(Params):
    method: str = field(default="eap-ig", metadata={"help": "'eap-ig' (integrated gradients) or 'eap'",
                                                    "choices": ["eap-ig", "eap"]})
    ig_steps: int = field(default=5, metadata={"help": "interpolation steps between corrupted and clean input (EAP-IG)"})
    top_n: int = field(default=0, metadata={"help": "edges kept, by absolute score, before pruning dangling nodes; "
                                                    "0: the smallest circuit that reaches `target`"})
    target: float = field(default=0.8, metadata={"help": "share of the metric the circuit must recover on its own "
                                                         "(faithfulness) when sized automatically"})
    threshold: float = field(default=0.0, metadata={"help": "only edges whose |score| is at least this"})
    metric: str = field(default="logit_diff", metadata={"help": "'logit_diff' (answer vs the contrast answer), "
                                                                "'logprob' or 'prob' of the answer",
                                                        "choices": ["logit_diff", "logprob", "prob"]})
    corruption: str = field(default="counterfactual", metadata={
        "help": "'counterfactual': swap in a subject whose answer is another real object; 'noise': Gaussian noise "
                "on the subject's embeddings", "choices": ["counterfactual", "noise"]})
    corrupt_subject: str = field(default="", metadata={"help": "subject to swap in (same token count); empty: pick one"})
    noise: float = field(default=3.0, metadata={"help": "Gaussian noise on the subject, times the embedding std "
                                                        "(corruption 'noise', or no counterfactual subject fits)"})
    faithfulness: bool = field(default=True, metadata={"help": "patch everything outside the circuit and measure the "
                                                               "metric (needed to size the circuit)"})

    def validate(self) -> None:
        if self.method not in ("eap-ig", "eap"):
            raise ValueError("method must be 'eap-ig' or 'eap'")
        if not 1 <= self.ig_steps <= 100:
            raise ValueError("ig_steps must be between 1 and 100")
        if not 0 <= self.top_n <= 100000:
            raise ValueError("top_n must be 0 (sized by faithfulness) or a number of edges up to 100000")
        if not 0 < self.target <= 1:
            raise ValueError("target must be in (0, 1]")
        if self.threshold < 0:
            raise ValueError("threshold must be non-negative")
        if self.metric not in ("logit_diff", "logprob", "prob"):
            raise ValueError("metric must be 'logit_diff', 'logprob' or 'prob'")
        if self.corruption not in ("counterfactual", "noise"):
            raise ValueError("corruption must be 'counterfactual' or 'noise'")
        if not 0.0 < self.noise <= 100.0:
            raise ValueError("noise must be in (0, 100] (a multiple of the embedding std)")
        if not self.faithfulness and not self.top_n:
            raise ValueError("without faithfulness the circuit cannot be sized by it: give top_n")


@register_method
class KnowledgeCircuits(Method):
    name = "knowledge_circuits"
    title = "Knowledge circuits"
    path = ("Internal", "Circuit")
    paper = "Yao et al. 2024, 'Knowledge Circuits in Pretrained Transformers' (EAP: Syed et al. 2023; EAP-IG: Hanna et al. 2024)"
    description = ("Finds the attention heads, MLPs and edges between them that carry the fact, by edge attribution "
                   "patching, and keeps the smallest circuit that recovers the fact on its own.")
    requires_keys = ("prompt", "triple_subject")
    requires_capabilities = ("causal_lm", "gradients")
    Params = KnowledgeCircuitsParams

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """Scoring the candidate subjects (one batch), then EAP: the corrupted row and one row per
        interpolation step, forward and backward, each layer's per-head gradients (batched over heads
        through the attention core and each head's q/k/v columns), the edge-score product, and the
        faithfulness passes of `circuits_search.search` (one row per circuit size): its first pass of 16
        log-spaced sizes, then with `top_n` 0 the refining passes of 8 sizes (2 counted: on 20 known_1000
        facts it ran 2.95 passes in all on average, docs/validity_circuits.md); the batch's activations and
        the gradients read at every layer are the peak."""
        from knowmri.methods.costs import (
            Dims,
            Pass,
            elementwise_seconds,
            matmul_seconds,
            prepare_passes,
            sample_shape,
            work_estimate,
        )

        p = params if isinstance(params, KnowledgeCircuitsParams) else KnowledgeCircuitsParams()
        shape = sample_shape(model, sample)
        dims = Dims.of(model)
        L, H, T = dims.layers, dims.heads, shape.prompt
        rows = 1 + (p.ig_steps if p.method == "eap-ig" else 1)
        candidates = 1 if p.corrupt_subject or p.corruption == "noise" else 12  # those of the subject's token length
        passes = [*prepare_passes(model, shape), Pass(rows=candidates, tokens=T, readout=candidates),
                  Pass(rows=rows, tokens=T, readout=rows, backward=True),
                  Pass(rows=16, tokens=T, readout=16, count=1 if p.faithfulness else 0),
                  Pass(rows=8, tokens=T, readout=8, count=2 if p.faithfulness and not p.top_n else 0)]
        qkv = dims.d + 2 * dims.kv  # q/k/v projection outputs per token
        heads = L * (matmul_seconds(model, 2 * H * rows * T * 3 * dims.d_head * dims.d, rows * T)
                     + matmul_seconds(model, 4 * H * rows * T * T * dims.d, T)
                     + elementwise_seconds(model, 6 * H * rows * T * (qkv + 2 * dims.d) * dims.bytes, ops=150))
        nodes = 2 + L * (H + 1)
        scores = matmul_seconds(model, 2 * nodes * nodes * T * dims.d, nodes) + elementwise_seconds(
            model, 4 * 4 * nodes * T * dims.d, ops=40 * L)
        read = L * rows * T * (3 * dims.d + H * dims.d_head) * dims.bytes  # reads kept for their gradients
        per_head = H * rows * T * (qkv + 3 * dims.d) * dims.bytes  # one layer's per-head gradients
        return work_estimate(model, passes, seconds=heads + scores, memory=read + per_head,
                             resident=2 * 4 * nodes * T * dims.d + 4 * nodes * nodes * 3)

    @uses_short_attention(torch.bfloat16)
    def run(self, model: Any, sample: Sample, params: KnowledgeCircuitsParams, ctx: RunContext) -> MethodResult:
        prep = prepare(model, sample, need_subject=True)
        clean = prep.enc.input_ids[:, : prep.enc.prompt_len]
        answer = prep.target_ids[0]
        ctx.progress(0.05, "building the corrupted input")
        corr = self._corrupt(model, sample, prep, clean, answer, params, ctx)
        alphas = [k / params.ig_steps for k in range(1, params.ig_steps + 1)] if params.method == "eap-ig" else [1.0]
        ctx.progress(0.2, f"attributing edges ({params.method})")
        graph = edge_attribution(model, clean, corr.ids.to(clean.device), answer, corr.wrong, alphas=alphas,
                                 metric=params.metric, noise=corr.noise,
                                 noise_positions=list(prep.subject) if corr.noise is not None else None)
        metric_corrupted, metric_clean = graph.metric[0], graph.metric[-1]
        if not metric_clean != metric_corrupted:  # also NaN
            raise ValueError(f"the corruption does not change the {params.metric.replace('_', ' ')} "
                             f"({metric_clean:.4g} clean and corrupted): no circuit can be attributed")
        order = ranked_edges(graph, params.threshold)
        if not len(order):
            raise ValueError(f"no edge has |score| >= threshold {params.threshold:g}: lower the threshold")
        found: Search | None = None
        if params.faithfulness:
            ctx.progress(0.75, "sizing the circuit by faithfulness" if not params.top_n else "measuring faithfulness")
            found = search(Evaluator(model, graph, order, clean, answer, corr.wrong, params.metric), params.target,
                           size=params.top_n or None)
            mask = found.mask
        else:
            mask = circuit_mask(graph, order[: params.top_n])
        if not bool(mask.any()):
            size = params.top_n or len(order)
            raise ValueError(f"empty circuit: none of the top {size} edges (of {int(graph.valid.sum())} scored) lie on a "
                             "path from the input to the logits"
                             + ("; raise top_n, or leave it at 0 to size the circuit by faithfulness" if params.top_n else ""))
        edges = edge_list(graph, mask)
        node_score = self._node_scores(graph)
        kept = {n for e in edges for n in e[:2]}
        order_of = {name: i for i, name in enumerate(["input", *graph.downstream])}
        n_down, flat = len(graph.downstream), graph.scores.flatten()
        tok = model.tokenizer
        result = self.new_result(params)
        result.findings = {
            "edges": [{"src": s, "dst": d, "score": sc} for s, d, sc in edges],
            "nodes": [{"name": n, "score": node_score[n], "layer": _layer(n, model.n_layers)}
                      for n in sorted(kept, key=order_of.get)],
            "top_edges": [{"src": graph.upstream[i // n_down], "dst": graph.downstream[i % n_down], "score": float(flat[i])}
                          for i in order[:50].tolist()],
            "metric": params.metric, "metric_clean": metric_clean, "metric_corrupted": metric_corrupted,
            "linear_estimate": float(graph.scores[0].sum()),
            "answer": tok.decode([answer]), "corrupted_answer": tok.decode([corr.wrong]),
            "contrast_subject": corr.subject, "contrast_answer": tok.decode([corr.wrong]),
            "corruption": corr.describe(tok), "method": params.method, "ig_steps": len(alphas),
            "n_edges_scored": int(graph.valid.sum()), "faithfulness": self._faithfulness(found, params),
        }
        self._verdict(result.findings, corr, found)
        result.arrays["edge_scores"] = graph.scores.numpy()
        self._report(result, model, edges, node_score, found)
        ctx.progress(1.0, "done")
        return result

    def _corrupt(self, model: Any, sample: Sample, prep: Any, clean: torch.Tensor, answer: int,
                 params: KnowledgeCircuitsParams, ctx: RunContext) -> Corruption:
        """A counterfactual subject of the same token length (see `circuits_corruption`), else noise on the subject."""
        subject, prompt = sample["triple_subject"], prep.prompt
        target_new = sample.get("target_new")
        contrast = first_token(model, prompt, target_new) if target_new else None
        contrast = None if contrast == answer else contrast
        positions = list(prep.subject)
        if params.corruption == "noise":
            return noise(model, clean, positions, params.noise, ctx.seed, answer, contrast)
        if params.corrupt_subject:
            candidates = [Candidate(params.corrupt_subject, None, "given")]
        else:
            rid = relation_id_of(sample)
            same = counterfactual_subjects(rid, subject, sample.get("triple_object") or prep.answer) if rid else []
            candidates = [Candidate(s, o, f"relation {rid}") for s, o in same]
            candidates += [Candidate(s, None, "built-in subjects") for s in SUBJECTS]
        found = counterfactual(model, prompt, subject, clean[0].tolist(), answer, candidates, contrast)
        if found is not None:
            if contrast is not None:
                found.source += "; contrast answer: target_new"
            return found
        why = (f"{params.corrupt_subject!r} does not tokenize to as many tokens as {subject!r}" if params.corrupt_subject
               else f"no counterfactual subject has as many tokens as {subject!r}")
        fallback = noise(model, clean, positions, params.noise, ctx.seed, answer, contrast)
        fallback.note = (f"{why}; Gaussian noise ({params.noise} x the embedding std) was added to the subject's "
                         "token embeddings instead")
        return fallback

    @staticmethod
    def _faithfulness(found: Search | None, params: KnowledgeCircuitsParams) -> dict[str, Any] | None:
        if found is None:
            return None
        chosen = found.chosen
        passing = [p.size for p in found.points if p.recovered is not None and p.recovered >= found.target]
        return {"recovered": chosen.recovered, "metric_circuit": chosen.metric, "curve": found.curve(),
                "chosen_size": chosen.size, "target": found.target, "circuit_edges": chosen.edges, "nodes": chosen.nodes,
                "sized_by": "top_n" if params.top_n else "faithfulness",
                "smallest_reaching_target": min(passing, default=None), "patched_passes": found.passes,
                "how": "the top edges by |score|, pruned to paths from the input to the logits; every head and MLP "
                       "outside the circuit outputs its corrupted activation (node-level)"}

    @staticmethod
    def _verdict(f: dict[str, Any], corr: Corruption, found: Search | None) -> None:
        """`holds` and `warnings`: an unfaithful circuit does not hold; caveats in plain words."""
        warnings = [corr.note] if corr.note else []
        if found is not None:
            rec = found.chosen.recovered or 0.0
            f["holds"] = rec >= UNFAITHFUL
            if f["faithfulness"]["sized_by"] == "faithfulness" and rec < found.target:
                warnings.append(f"no circuit size reached the target {found.target:.0%}; the most faithful one "
                                f"({rec:.0%}) is shown")
            if rec < UNFAITHFUL:
                warnings.append(f"the circuit is unfaithful: on its own it recovers only {rec:.0%} of the metric")
            if rec > 1.2:
                warnings.append(f"the circuit recovers {rec:.0%} of the metric, more than the whole model: components "
                                "outside it work against the answer")
        f["warnings"] = warnings

    @staticmethod
    def _node_scores(graph: Any) -> dict[str, float]:
        """Each node's attribution: the sum of its outgoing edge scores (incoming for logits)."""
        out = {name: float(graph.scores[i].sum()) for i, name in enumerate(graph.upstream)}
        out["logits"] = float(graph.scores[:, -1].sum())
        return out

    def _report(self, result: MethodResult, model: Any, edges: list[tuple[str, str, float]], node_score: dict[str, float],
                found: Search | None) -> None:
        f = result.findings
        c = f["corruption"]
        how = (f"swapping the subject for {c['subject']!r} (the model then answers {c['model_answer']!r})"
               if c["kind"] == "counterfactual" else "noising the subject")
        text = (f"Corrupting the prompt by {how} moves the {f['metric'].replace('_', ' ')} of {f['answer']!r} "
                f"(vs {f['contrast_answer']!r}) from {f['metric_clean']:.3g} to {f['metric_corrupted']:.3g}. ")
        heads = [n["name"] for n in f["nodes"] if n["name"].startswith("a")]
        mlps = [n["name"] for n in f["nodes"] if n["name"].startswith("m")]
        best = edges[0]
        faith = f["faithfulness"]
        if faith is None:
            text += f"The circuit of the top {result.params['top_n']} edges"
        elif faith["sized_by"] == "faithfulness" and faith["recovered"] >= faith["target"]:
            text += f"The smallest circuit that recovers {faith['target']:.0%} of it on its own"
        elif faith["sized_by"] == "faithfulness":
            text += f"No circuit recovers {faith['target']:.0%} of it; the most faithful one"
        else:
            text += f"The circuit of the top {faith['chosen_size']} edges"
        text += (f" ({f['method'].upper()}) keeps {len(edges)} edges between {len(heads)} attention heads and "
                 f"{len(mlps)} MLPs; the strongest edge is {best[0]} -> {best[1]} ({best[2]:+.3g}).")
        if faith is not None:
            rec = faith["recovered"]
            verdict = "faithful" if rec >= faith["target"] else "unfaithful" if rec < UNFAITHFUL else "partly faithful"
            text += (f" With everything outside it corrupted, it recovers {rec:.0%} of the clean metric: the circuit is "
                     f"{verdict}.")
            if faith["sized_by"] == "top_n" and faith["smallest_reaching_target"] is not None:
                text += f" {faith['target']:.0%} is first reached with the top {faith['smallest_reaching_target']} edges."
        for warning in f["warnings"]:
            text += f" Warning: {warning}."
        result.summary = text
        shown = edges[:SHOWN]
        title = "Circuit graph" if len(edges) <= SHOWN else f"Circuit graph (the strongest {SHOWN} of {len(edges)} edges)"
        result.add_figure("Circuit graph", _graph_figure(shown, node_score, model.n_layers, model.n_heads, title))
        if found is not None:
            result.add_figure("Faithfulness by circuit size", _curve_figure(faith))
        result.add_table("Circuit edges", ["src", "dst", "score"], [[s, d, round(sc, 6)] for s, d, sc in shown])
        result.add_table("Circuit nodes", ["node", "layer", "attribution"],
                         [[n["name"], n["layer"], round(n["score"], 6)] for n in f["nodes"]])
        if found is not None:
            result.add_table("Faithfulness by circuit size", ["top edges", "circuit edges", "nodes", "recovered"],
                             [[p["edges"], p["circuit_edges"], p["nodes"], round(p["recovered"], 4)] for p in faith["curve"]])


def _layer(name: str, n_layers: int) -> int:
    if name == "input":
        return -1
    if name == "logits":
        return n_layers
    return int(name[1:].split(".")[0])


def _graph_figure(edges: list[tuple[str, str, float]], node_score: dict[str, float], n_layers: int, n_heads: int,
                  title: str = "Circuit graph") -> Any:
    """Nodes by layer on the x axis (heads stacked, the MLP above them); edge width grows with |score|."""
    from knowmri.report import figures

    def pos(name: str) -> tuple[float, float]:
        layer = _layer(name, n_layers)
        if name in ("input", "logits"):
            return layer, n_heads / 2
        if name.startswith("m"):
            return layer + 0.35, n_heads + 0.5
        return layer, int(name.split(".h")[1])

    peak = max((abs(e[2]) for e in edges), default=1.0) or 1.0
    traces = []
    for src, dst, score in sorted(edges, key=lambda e: abs(e[2])):
        (x0, y0), (x1, y1) = pos(src), pos(dst)
        traces.append({"hoverinfo": "text", "mode": "lines", "opacity": 0.75, "showlegend": False,
                       "text": f"{src} -> {dst}: {score:+.4g}", "x": [x0, x1], "y": [y0, y1], "type": "scatter",
                       "line": {"width": 1 + 7 * abs(score) / peak, "color": "#2b6cb0" if score <= 0 else "#c53030"}})
    names = sorted({n for e in edges for n in e[:2]}, key=lambda n: (_layer(n, n_layers), n))
    xy = [pos(n) for n in names]
    traces.append({"x": [p[0] for p in xy], "y": [p[1] for p in xy], "mode": "markers+text", "text": names,
                   "textposition": "top center", "showlegend": False,
                   "hovertext": [f"{n}: attribution {node_score.get(n, 0.0):+.4g}" for n in names], "hoverinfo": "text",
                   "marker": {"size": 14, "color": ["#805ad5" if n.startswith("a") else "#dd6b20" if n.startswith("m")
                                                    else "#4a5568" for n in names]}, "type": "scatter"})
    return figures.figure(traces, title=f"{title}: blue, corrupting the edge lowers the metric; red, raises it; "
                                        "width: |score|",
                          xaxis={"title": {"text": "layer (input = -1, logits = last)"}, "dtick": 1},
                          yaxis={"title": {"text": "head (MLP on top)"}}, margin=figures.MARGIN)


def _curve_figure(faith: dict[str, Any]) -> Any:
    """The share of the metric recovered over the number of top edges kept (log axis), the target and the chosen size."""
    from knowmri.report import figures

    curve = faith["curve"]
    traces = [
        {"mode": "lines+markers", "name": "circuit", "x": [p["edges"] for p in curve],
         "y": [p["recovered"] for p in curve], "type": "scatter",
         "text": [f"{p['circuit_edges']} edges after pruning, {p['nodes']} nodes" for p in curve]},
        {"mode": "lines", "name": f"target {faith['target']:.0%}", "x": [curve[0]["edges"], curve[-1]["edges"]],
         "y": [faith["target"]] * 2, "line": {"dash": "dash", "color": "#718096"}, "type": "scatter"},
        {"mode": "markers", "name": f"chosen: top {faith['chosen_size']} edges", "x": [faith["chosen_size"]],
         "y": [faith["recovered"]], "marker": {"size": 12, "symbol": "star", "color": "#c53030"}, "type": "scatter"},
    ]
    return figures.figure(traces, title="Faithfulness by circuit size (node-level patching)",
                          xaxis={"title": {"text": "top edges kept (before pruning)"}, "type": "log"},
                          yaxis={"title": {"text": "share of the metric recovered"}}, margin=figures.MARGIN)
