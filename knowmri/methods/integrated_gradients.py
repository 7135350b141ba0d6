"""Integrated gradients (Sundararajan et al. 2017): how much each input token's embedding
contributes to the probability of each answer token.

Attribution of input token t for answer token a is sum_d (x - x')_td * integral_0^1
dP_a(x' + alpha (x - x')) / dx_td dalpha, the integral taken with Captum's quadrature
(the right Riemann rule by default, or Gauss-Legendre and the other Riemann rules) so that results equal Captum's
`LayerIntegratedGradients` on the embedding layer. All interpolation steps of all answer
tokens run as one batch (chunked by `internal_batch_size`); one backward per chunk.

The steps double until the attributions are complete (their sum within `tolerance` of f(input) -
f(baseline)) or `max_steps` is reached; the default right Riemann rule's points at 2n steps hold those
at n, so each doubling computes only the new half. In a dataset run, the rows of inputs of one length
share batches (`integrated_gradients_many`, causal models): a row's gradient depends on its own input
only, so the results are those of one input at a time (up to float rounding). The subject's share of the attribution is reported
next to its share of the tokens (`subject_dominance` is their ratio): a subject of 4 tokens out of 9
"carrying 45%" carries about its share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import prepare
from knowmri.methods.ig_engine import BASELINES, METHODS, integrated_gradients, integrated_gradients_many
from knowmri.models.attention import uses_short_attention
from knowmri.report import figures
from knowmri.sample import Sample

CACHE_KEY = ("integrated_gradients", "token_scores")


@dataclass
class IntegratedGradientsParams(Params):
    steps: int = field(default=20, metadata={"help": "interpolation steps between the baseline and the input"})
    max_steps: int = field(default=160, metadata={"help": "the steps double while the completeness gap exceeds "
                                                          "`tolerance`, up to this many (steps or less: no doubling)"})
    tolerance: float = field(default=0.05, metadata={"help": "relative completeness gap the doubling aims for"})
    baseline: str = field(default="zero", metadata={"help": "'zero' embeddings, the 'pad' token's embedding, or ROME-style "
                                                            "Gaussian 'noise' (3x the embeddings' std, seeded)",
                                                    "choices": list(BASELINES)})
    method: str = field(default="riemann_right", metadata={"help": "quadrature rule (Captum's names); the right rule's "
                                                           "points at 2n steps hold those at n, so doubling reuses them",
                                                           "choices": list(METHODS)})
    objective: str = field(default="prob", metadata={"help": "attribute the answer token's 'prob' or 'logprob'",
                                                     "choices": ["prob", "logprob"]})
    internal_batch_size: int = field(default=64, metadata={"help": "interpolated inputs per forward/backward pass"})

    def validate(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise ValueError("steps must be between 1 and 1000")
        if self.method.startswith("riemann") and self.steps < 2:
            raise ValueError("Riemann rules need at least 2 steps")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}")
        if not 1 <= self.max_steps <= 1000:
            raise ValueError("max_steps must be between 1 and 1000")
        if not 0 < self.tolerance < 1:
            raise ValueError("tolerance must be between 0 and 1")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        if self.objective not in ("prob", "logprob"):
            raise ValueError("objective must be 'prob' or 'logprob'")
        if self.internal_batch_size < 1:
            raise ValueError("internal_batch_size must be at least 1")


#: Gradient points of an adaptive run, as a multiple of its starting steps: on 12 known_1000 facts
#: (SmolLM2, docs/validity_readouts_ps_ig.md) the doubling stopped at 1x, 2x or 4x the 20 starting
#: steps, 1.6x on average (the right rule's points at 2n steps hold those at n).
ADAPTIVE_POINTS = 1.6


def expected_points(p: IntegratedGradientsParams) -> int:
    """The gradient points a run is expected to compute: `steps`, or with doubling allowed (`max_steps` at
    least twice `steps`) `ADAPTIVE_POINTS` x `steps`; a rule whose points at n steps are not among those at
    2n (midpoints, Gauss-Legendre) computes twice the extra points. Never more than the doubling can reach."""
    if p.max_steps < 2 * p.steps:
        return p.steps
    most = p.steps
    while 2 * most <= p.max_steps:
        most *= 2
    shares = p.method in ("riemann_right", "riemann_left", "riemann_trapezoid")
    extra = (ADAPTIVE_POINTS - 1) * p.steps * (1 if shares else 2)
    cap = most if shares else 2 * most - p.steps  # n + 2n + 4n + ... without sharing
    return min(round(p.steps + extra), cap)


@register_method
class IntegratedGradients(Method):
    name = "integrated_gradients"
    title = "Integrated gradients"
    path = ("External", "Attribution")
    paper = "Sundararajan et al. 2017, 'Axiomatic Attribution for Deep Networks'"
    description = "Attributes the answer's probability to each input token by integrating gradients along a path from a baseline."
    requires_keys = ("prompt",)
    requires_capabilities = ("gradients",)
    Params = IntegratedGradientsParams

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """The gradient points x answer-token rows over the whole input, forward and backward in batches of
        `internal_batch_size` rows (read out at the answer's positions), then one forward of the two
        endpoints; the batch's activations are the peak. The points are `expected_points`: the starting
        steps and, where `max_steps` allows, the doubling the completeness check usually asks for."""
        from knowmri.methods.costs import Pass, prepare_passes, sample_shape, work_estimate

        p = params if isinstance(params, IntegratedGradientsParams) else IntegratedGradientsParams()
        shape = sample_shape(model, sample)
        rows = expected_points(p) * shape.answer
        batch = min(p.internal_batch_size, rows)
        full, rest = divmod(rows, batch)
        tokens = shape.input + shape.decoder
        keep = shape.answer if model.kind == "causal" and model.takes_logits_to_keep else shape.positions
        passes = [*prepare_passes(model, shape),
                  Pass(rows=batch, tokens=tokens, readout=batch * keep, backward=True, count=full),
                  Pass(rows=rest, tokens=tokens, readout=rest * keep, backward=True, count=1 if rest else 0),
                  Pass(rows=2 * shape.answer, tokens=tokens, readout=2 * shape.answer * keep)]
        buffers = 4 * (shape.answer + 3) * shape.input * model.d_model  # the summed gradients, x, x0, delta
        return work_estimate(model, passes, memory=buffers)

    @uses_short_attention(torch.bfloat16)
    def run(self, model: Any, sample: Sample, params: IntegratedGradientsParams, ctx: RunContext) -> MethodResult:
        prep = prepare(model, sample)
        ctx.progress(0.05, "integrating gradients")
        out = integrated_gradients(model, prep.enc, **_options(params))
        return self._result(model, prep, out, params, ctx)

    @uses_short_attention(torch.bfloat16)
    def run_batch(self, model: Any, samples: list[Sample], params: IntegratedGradientsParams,
                  contexts: list[RunContext]) -> list[MethodResult] | None:
        """Several samples' IG with the rows of same-length inputs in shared batches (causal models)."""
        if model.kind != "causal" or len(samples) < 2:
            return None
        preps = [prepare(model, sample) for sample in samples]
        for ctx in contexts:
            ctx.progress(0.05, "integrating gradients")
        outs = integrated_gradients_many(model, [prep.enc for prep in preps], **_options(params))
        return [self._result(model, prep, out, params, ctx) for prep, out, ctx in zip(preps, outs, contexts)]

    def _result(self, model: Any, prep: Any, out: dict[str, Any], params: IntegratedGradientsParams,
                ctx: RunContext) -> MethodResult:
        """The result of one sample's IG run (`out` from `integrated_gradients`)."""
        enc = prep.enc
        ctx.progress(0.9, "summarising")
        attr = out["attributions"]  # [n_answer, T]
        deltas = out["f_input"] - out["f_baseline"]
        gaps = attr.sum(-1) - deltas
        rel = gaps.abs() / deltas.abs().clamp_min(1e-12)
        tok = model.tokenizer
        special = set(tok.all_special_ids or [])
        ids = enc.input_ids[0].tolist()
        n_scored = enc.prompt_len if model.kind == "causal" else len(ids)
        summed = attr[:, :n_scored].sum(0)
        token_scores = [{"index": i, "token": prep.tokens[i], "score": float(summed[i]), "special": ids[i] in special}
                        for i in range(n_scored)]
        ctx.cache[CACHE_KEY] = token_scores
        ranked = sorted((t for t in token_scores if not t["special"]), key=lambda t: -t["score"])
        answer_tokens = [tok.decode([t]) for t in enc.target_ids]
        subject_share = token_share = dominance = None
        if prep.subject is not None:
            mags = {t["index"]: abs(t["score"]) for t in token_scores if not t["special"]}
            subject_share = sum(mags.get(i, 0.0) for i in prep.subject) / max(sum(mags.values()), 1e-12)
            token_share = sum(1 for i in prep.subject if i in mags) / max(len(mags), 1)
            dominance = subject_share / token_share if token_share else None
        rel_gap = float(rel.max())
        warnings = []
        if not np.isfinite(rel_gap):
            warnings.append(f"the completeness gap is not finite (a gradient on the path from the {params.baseline} "
                            "baseline is NaN or infinite); try another baseline or rule")
        elif rel_gap > params.tolerance:
            warnings.append(f"stopped short: the attributions miss completeness by {rel_gap:.0%} at {out['steps']} steps "
                            f"(max_steps {params.max_steps}, tolerance {params.tolerance:.0%})")
        result = self.new_result(params)

        def reach(a: int) -> int:  # a causal answer token sees the input up to its own position
            return enc.target_positions[a] + 1 if model.kind == "causal" else len(ids)

        result.findings = {
            "token_scores": token_scores,
            "ranking": [t["index"] for t in ranked],
            "answer": prep.answer, "answer_source": prep.answer_source, "answer_tokens": answer_tokens,
            "objective": params.objective,
            "answer_token_scores": [{"answer_index": a, "answer_token": answer_tokens[a], "position": enc.target_positions[a],
                                     "scores": [float(v) for v in attr[a, : reach(a)]]}
                                    for a in range(len(answer_tokens))],
            "f_input": [float(v) for v in out["f_input"]], "f_baseline": [float(v) for v in out["f_baseline"]],
            "completeness_gaps": [float(v) for v in gaps],
            "completeness_gap": float(gaps.abs().max()), "completeness_gap_relative": rel_gap if np.isfinite(rel_gap) else None,
            "steps": out["steps"], "gradient_points": out["points"],
            "steps_history": [{"steps": n, "gap": g} for n, g in out["history"]],
            "subject_span": [prep.subject.start, prep.subject.stop] if prep.subject is not None else None,
            "subject_share": subject_share, "subject_token_share": token_share, "subject_dominance": dominance,
        }
        if warnings:
            result.findings["warnings"] = warnings
        self._report(result, prep, token_scores, ranked, attr, params, out["steps"], warnings)
        ctx.progress(1.0, "done")
        return result

    def _report(self, result: MethodResult, prep: Any, token_scores: list[dict], ranked: list[dict], attr: torch.Tensor,
                params: IntegratedGradientsParams, steps: int, warnings: list[str]) -> None:
        answer_tokens = result.findings["answer_tokens"]
        top = ", ".join(f"{t['token']!r} ({t['score']:+.3g})" for t in ranked[:3]) or "none"
        text = (f"Integrated gradients of {'P' if params.objective == 'prob' else 'log P'}({prep.answer!r}, {prep.answer_source}) "
                f"from a {params.baseline} baseline ({steps} steps, {params.method}): the most supportive input tokens "
                f"are {top}.")
        f = result.findings
        if not warnings:
            text += f" Complete within {f['completeness_gap_relative']:.1%} at {steps} steps (sum of attributions vs f(input) - f(baseline))."
        if f["subject_share"] is not None:
            subj = ''.join(prep.tokens[i] for i in prep.subject).strip()
            text += (f" The subject {subj!r} carries {f['subject_share']:.0%} of the total attribution magnitude with "
                     f"{f['subject_token_share']:.0%} of the tokens")
            text += (f": {f['subject_dominance']:.2f}x its share of tokens." if f["subject_dominance"] is not None else ".")
        flagged = [t["token"] for t in token_scores if t["special"]]
        if flagged:
            text += f" Special tokens ({', '.join(map(repr, flagged))}) are scored but left out of the ranking."
        for w in warnings:
            text += f" Warning: {w}."
        result.summary = text
        labels = [f"{t['index']}:{t['token']}" for t in token_scores]
        result.add_figure("Attribution per input token", figures.bars(
            labels, [t["score"] for t in token_scores], title=f"Integrated gradients of {prep.answer!r} per input token",
            x_title="input token", y_title="attribution"))
        n_pos = attr.shape[1]
        bound = max(float(attr.abs().max()), 1e-12)
        all_labels = [f"{i}:{prep.tokens[i]}" for i in range(n_pos)]
        result.add_figure("Attribution per answer token", figures.heatmap(
            attr.tolist(), x=all_labels, y=[f"{a}:{t}" for a, t in enumerate(answer_tokens)],
            title="Integrated gradients: each answer token (row) over the input tokens", x_title="input token",
            y_title="answer token", colorscale="RdBu", zmin=-bound, zmax=bound, colorbar="attribution"))
        result.add_table("Token attributions", ["index", "token", "score", "special", "rank"],
                         [[t["index"], t["token"], round(t["score"], 6), t["special"],
                           next((r + 1 for r, u in enumerate(ranked) if u["index"] == t["index"]), None)]
                          for t in token_scores])
        result.add_table("Completeness", ["answer token", "f(input)", "f(baseline)", "sum of attributions", "gap"],
                         [[answer_tokens[a], round(result.findings["f_input"][a], 6), round(result.findings["f_baseline"][a], 6),
                           round(float(attr[a].sum()), 6), round(result.findings["completeness_gaps"][a], 6)]
                          for a in range(len(answer_tokens))])


def _options(params: IntegratedGradientsParams) -> dict[str, Any]:
    """The keyword arguments of `integrated_gradients` from the method's parameters."""
    return {"steps": params.steps, "baseline": params.baseline, "method": params.method, "objective": params.objective,
            "internal_batch_size": params.internal_batch_size, "max_steps": params.max_steps, "tolerance": params.tolerance}
