"""Knowledge circuits (Yao et al. 2024): the subgraph of attention heads and MLPs that carries a
fact from the subject to the answer, found with edge attribution patching (EAP, Syed et al.
2023) or its integrated-gradients variant (EAP-IG, Hanna et al. 2024); see `circuits_engine`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.circuits_engine import (
    SUBJECTS,
    choose_subject,
    edge_attribution,
    forward_logits,
    patched_metric,
    prune,
)
from knowmri.methods.common import prepare
from knowmri.models.attention import uses_short_attention
from knowmri.sample import Sample


@dataclass
class KnowledgeCircuitsParams(Params):
    method: str = field(default="eap-ig", metadata={"help": "'eap-ig' (integrated gradients) or 'eap'",
                                                    "choices": ["eap-ig", "eap"]})
    ig_steps: int = field(default=5, metadata={"help": "interpolation steps between corrupted and clean input (EAP-IG)"})
    top_n: int = field(default=50, metadata={"help": "edges kept, by absolute score, before pruning dangling nodes"})
    threshold: float = field(default=0.0, metadata={"help": "also drop edges whose |score| is below this"})
    metric: str = field(default="logit_diff", metadata={"help": "'logit_diff' (answer vs the corrupted run's answer), "
                                                                "'logprob' or 'prob' of the answer",
                                                        "choices": ["logit_diff", "logprob", "prob"]})
    corrupt_subject: str = field(default="", metadata={"help": "subject to swap in (same token count); empty: pick one"})
    noise: float = field(default=3.0, metadata={"help": "fallback: Gaussian noise on the subject, times the embedding std"})
    faithfulness: bool = field(default=True, metadata={"help": "patch everything outside the circuit and measure the metric"})

    def validate(self) -> None:
        if self.method not in ("eap-ig", "eap"):
            raise ValueError("method must be 'eap-ig' or 'eap'")
        if not 1 <= self.ig_steps <= 100:
            raise ValueError("ig_steps must be between 1 and 100")
        if not 1 <= self.top_n <= 2000:
            raise ValueError("top_n must be between 1 and 2000")
        if self.threshold < 0:
            raise ValueError("threshold must be non-negative")
        if self.metric not in ("logit_diff", "logprob", "prob"):
            raise ValueError("metric must be 'logit_diff', 'logprob' or 'prob'")
        if not 0.0 < self.noise <= 100.0:
            raise ValueError("noise must be in (0, 100] (a multiple of the embedding std)")


@register_method
class KnowledgeCircuits(Method):
    name = "knowledge_circuits"
    title = "Knowledge circuits"
    path = ("Internal", "Circuit")
    paper = "Yao et al. 2024, 'Knowledge Circuits in Pretrained Transformers' (EAP: Syed et al. 2023; EAP-IG: Hanna et al. 2024)"
    description = "Finds the attention heads, MLPs and edges between them that carry the fact, by edge attribution patching."
    requires_keys = ("prompt", "triple_subject")
    requires_capabilities = ("causal_lm", "gradients")
    Params = KnowledgeCircuitsParams

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """Scoring the candidate subjects (one batch), then EAP: the corrupted row and one row per
        interpolation step, forward and backward, each layer's per-head gradients (batched over heads
        through the attention core and each head's q/k/v columns), the edge-score product, and the
        faithfulness forward; the batch's activations and the gradients read at every layer are the peak."""
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
        candidates = 1 if p.corrupt_subject else min(24, len(SUBJECTS) // 3)  # those of the subject's token length
        passes = [*prepare_passes(model, shape), Pass(rows=candidates, tokens=T, readout=candidates),
                  Pass(rows=rows, tokens=T, readout=rows, backward=True),
                  Pass(tokens=T, readout=1, count=1 if p.faithfulness else 0)]
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
        corruption, corrupt_ids, wrong, noise = self._corrupt(model, sample, prep, clean, answer, params, ctx)
        alphas = [k / params.ig_steps for k in range(1, params.ig_steps + 1)] if params.method == "eap-ig" else [1.0]
        ctx.progress(0.2, f"attributing edges ({params.method})")
        graph = edge_attribution(model, clean, corrupt_ids, answer, wrong, alphas=alphas, metric=params.metric,
                                 noise=noise, noise_positions=list(prep.subject) if noise is not None else None)
        metric_corrupted, metric_clean = graph.metric[0], graph.metric[-1]
        ctx.progress(0.8, "pruning the circuit")
        n_valid = int(graph.valid.sum())
        magnitude = torch.where(graph.valid, graph.scores.abs(), torch.tensor(-1.0))
        best = magnitude.flatten().topk(min(params.top_n, n_valid)).indices.tolist()
        n_down = len(graph.downstream)
        top = [(graph.upstream[i // n_down], graph.downstream[i % n_down], float(graph.scores.flatten()[i])) for i in best
               if float(magnitude.flatten()[i]) >= params.threshold]
        edges = prune(top)
        node_score = self._node_scores(graph)
        kept = {n for e in edges for n in e[:2]}
        faith = None
        if params.faithfulness and edges:
            circuit_metric = patched_metric(model, clean, kept, graph.corrupted_acts, answer, wrong, params.metric)
            span = metric_clean - metric_corrupted
            faith = {"metric_circuit": circuit_metric, "recovered": (circuit_metric - metric_corrupted) / span if span else None,
                     "how": "every head and MLP outside the circuit outputs its corrupted activation (node-level)"}
        order = {name: i for i, name in enumerate(["input", *graph.downstream])}
        result = self.new_result(params)
        tok = model.tokenizer
        result.findings = {
            "edges": [{"src": s, "dst": d, "score": sc} for s, d, sc in edges],
            "nodes": [{"name": n, "score": node_score[n], "layer": _layer(n, model.n_layers)} for n in sorted(kept, key=order.get)],
            "top_edges": [{"src": s, "dst": d, "score": sc} for s, d, sc in top],
            "metric": params.metric, "metric_clean": metric_clean, "metric_corrupted": metric_corrupted,
            "linear_estimate": float(graph.scores[0].sum()),
            "answer": tok.decode([answer]), "corrupted_answer": tok.decode([wrong]), "corruption": corruption,
            "method": params.method, "ig_steps": len(alphas), "n_edges_scored": n_valid, "faithfulness": faith,
        }
        result.arrays["edge_scores"] = graph.scores.numpy()
        self._report(result, model, edges, node_score)
        ctx.progress(1.0, "done")
        return result

    def _corrupt(self, model: Any, sample: Sample, prep: Any, clean: torch.Tensor, answer: int,
                 params: KnowledgeCircuitsParams, ctx: RunContext) -> tuple[dict, torch.Tensor, int, torch.Tensor | None]:
        """The corrupted prompt: the subject swapped for one of the same token length, else noise on it."""
        subject, prompt = sample["triple_subject"], prep.prompt
        ids = clean[0].tolist()
        candidates = (params.corrupt_subject,) if params.corrupt_subject else SUBJECTS
        found = choose_subject(model, prompt, subject, ids, answer, candidates)
        if found is not None:
            cand, corrupt_ids, wrong, scored = found
            start = prompt.rindex(subject)
            return ({"kind": "subject swap", "subject": cand, "prompt": prompt[:start] + cand + prompt[start + len(subject):],
                     "candidates_scored": scored},
                    torch.tensor([corrupt_ids], device=clean.device), wrong, None)
        why = (f"{params.corrupt_subject!r} does not tokenize to as many tokens as {subject!r}" if params.corrupt_subject
               else f"no built-in subject has as many tokens as {subject!r}")
        gen = torch.Generator().manual_seed(ctx.seed)
        std = float(model.embed_module.weight.detach().float().std())
        noise = torch.randn(len(prep.subject), model.d_model, generator=gen) * params.noise * std
        with torch.no_grad():
            from knowmri.hooks import Hooks

            with Hooks(model) as h:
                h.add("embed", noise, positions=list(prep.subject))
                top2 = forward_logits(model, clean)[0, -1].topk(2).indices.tolist()
        wrong = top2[1] if top2[0] == answer else top2[0]
        return ({"kind": "noise", "scale": params.noise, "note": f"{why}; Gaussian noise ({params.noise} x the embedding "
                 "std) was added to the subject's token embeddings instead"}, clean, wrong, noise)

    @staticmethod
    def _node_scores(graph: Any) -> dict[str, float]:
        """Each node's attribution: the sum of its outgoing edge scores (incoming for logits)."""
        out = {name: float(graph.scores[i].sum()) for i, name in enumerate(graph.upstream)}
        out["logits"] = float(graph.scores[:, -1].sum())
        return out

    def _report(self, result: MethodResult, model: Any, edges: list[tuple[str, str, float]], node_score: dict[str, float]) -> None:
        f = result.findings
        c = f["corruption"]
        how = f"swapping the subject for {c['subject']!r}" if c["kind"] == "subject swap" else "noising the subject"
        text = (f"Corrupting the prompt by {how} moves the {f['metric'].replace('_', ' ')} of {f['answer']!r} "
                f"(vs {f['corrupted_answer']!r}) from {f['metric_clean']:.3g} to {f['metric_corrupted']:.3g}. ")
        if not edges:
            text += f"None of the top {len(f['top_edges'])} edges ({f['method'].upper()}) lie on a path from the input to the logits."
        else:
            heads = [n["name"] for n in f["nodes"] if n["name"].startswith("a")]
            mlps = [n["name"] for n in f["nodes"] if n["name"].startswith("m")]
            best = max(edges, key=lambda e: abs(e[2]))
            text += (f"The circuit ({f['method'].upper()}) keeps {len(edges)} edges between {len(heads)} attention heads "
                     f"and {len(mlps)} MLPs; the strongest edge is {best[0]} -> {best[1]} ({best[2]:+.3g}).")
            faith = f["faithfulness"]
            if faith and faith["recovered"] is not None:
                text += f" With everything outside it corrupted, the circuit recovers {faith['recovered']:.0%} of the clean metric."
        if c["kind"] == "noise":
            text += f" Note: {c['note']}."
        result.summary = text
        result.add_figure("Circuit graph", _graph_figure(edges, node_score, model.n_layers, model.n_heads))
        result.add_table("Circuit edges", ["src", "dst", "score"], [[s, d, round(sc, 6)] for s, d, sc in edges])
        result.add_table("Circuit nodes", ["node", "layer", "attribution"],
                         [[n["name"], n["layer"], round(n["score"], 6)] for n in f["nodes"]])


def _layer(name: str, n_layers: int) -> int:
    if name == "input":
        return -1
    if name == "logits":
        return n_layers
    return int(name[1:].split(".")[0])


def _graph_figure(edges: list[tuple[str, str, float]], node_score: dict[str, float], n_layers: int, n_heads: int) -> Any:
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
    return figures.figure(traces, title="Knowledge circuit (blue: corrupting the edge lowers the metric, red: raises it; width: |score|)",
                          xaxis={"title": {"text": "layer (input = -1, logits = last)"}, "dtick": 1},
                          yaxis={"title": {"text": "head (MLP on top)"}}, margin=figures.MARGIN)
