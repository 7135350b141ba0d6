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

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import prepare
from knowmri.models.arch import resolve
from knowmri.models.attention import uses_short_attention
from knowmri.models.model import Encoded
from knowmri.report import figures
from knowmri.sample import Sample

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
BASELINES = ("zero", "pad", "noise")
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


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """(step sizes, alphas) exactly as Captum's `approximation_parameters` builds them."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (0.5 * weights).tolist(), (0.5 * (1 + nodes)).tolist()
    sizes = [1 / steps] * steps
    kind = method.split("_")[-1]
    if kind == "trapezoid":
        sizes[0] /= 2
        sizes[-1] /= 2
        return sizes, torch.linspace(0, 1, steps).tolist()
    lo, hi = {"left": (0, 1 - 1 / steps), "middle": (1 / (2 * steps), 1 - 1 / (2 * steps)), "right": (1 / steps, 1)}[kind]
    return sizes, torch.linspace(lo, hi, steps).tolist()


def input_embedding_module(model: Any) -> torch.nn.Module:
    """The embedding whose output IG interpolates: the encoder's for seq2seq, else the token embedding."""
    if model.kind == "seq2seq" and model.spec.encoder_embed:
        found = resolve(model.hf_model, model.spec.encoder_embed)
        if found is not None:
            return found[1]
    return model.embed_module


def _forward_embeds(model: Any, embeds: torch.Tensor, enc: Encoded, keep: list[int] | None) -> torch.Tensor:
    """Logits from input embeddings; with `keep`, only at those positions (no vocabulary projection elsewhere)."""
    return model.run(**enc.inputs(embeds.shape[0], embeds=embeds), keep=keep).logits


def _kept_positions(model: Any, enc: Encoded) -> tuple[list[int] | None, list[int]]:
    """The positions to compute logits at (None: all) and each target's index among the computed ones."""
    if model.kind == "causal":
        keep = sorted(set(enc.target_positions))
        return keep, [keep.index(p) for p in enc.target_positions]
    return None, list(enc.target_positions)


def _objective(logits: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor, objective: str) -> torch.Tensor:
    """Per row: P or log P of that row's answer token at that row's position."""
    picked = logits[torch.arange(logits.shape[0], device=logits.device), positions.to(logits.device)].float()
    logp = picked.log_softmax(-1).gather(-1, ids.to(logits.device)[:, None])[:, 0]
    return logp if objective == "logprob" else logp.exp()


def baseline_embeddings(model: Any, ids: torch.Tensor, x: torch.Tensor, baseline: str) -> torch.Tensor:
    """The path's start: zero embeddings, the pad token's embedding at every position, or ROME-style noise
    (Meng et al. 2022: Gaussian with 3x the standard deviation of the input's embeddings, seeded)."""
    if baseline == "pad":
        if model.tokenizer.pad_token_id is None:
            raise ValueError("the 'pad' baseline needs a tokenizer with a pad token")
        return input_embedding_module(model)(torch.full_like(ids, model.tokenizer.pad_token_id))[0]
    if baseline == "noise":
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32)
        return (3 * x.float().std() * noise).to(device=x.device, dtype=x.dtype)
    return torch.zeros_like(x)


class PathIntegral:
    """Gradients of the answer along the straight path from a baseline to the input, kept per point.

    Each point alpha is computed once, as the gradient dotted with (input - baseline) per answer token and
    input position; a quadrature rule then sums the points it needs, so a finer rule that shares points
    with a coarser one (a Riemann rule at 2n steps holds those at n) only computes the new ones.
    """

    def __init__(self, model: Any, enc: Encoded, *, baseline: str = "zero", objective: str = "prob",
                 internal_batch_size: int = 64) -> None:
        self.model, self.enc, self.objective, self.batch = model, enc, objective, internal_batch_size
        ids = enc.input_ids
        with torch.no_grad():
            self.x = input_embedding_module(model)(ids)[0]
            self.x0 = baseline_embeddings(model, ids, self.x, baseline)
        self.delta = (self.x - self.x0).float()
        self.n_ans = len(enc.target_ids)
        self.keep, read_at = _kept_positions(model, enc)
        self.tgt_pos = torch.tensor(read_at, dtype=torch.long)
        self.tgt_ids = torch.tensor(enc.target_ids, dtype=torch.long)
        self.points: dict[float, torch.Tensor] = {}  # alpha -> [n_answer, T]

    @staticmethod
    def key(alpha: float) -> float:
        return round(float(alpha), 9)

    def compute(self, alphas: list[float]) -> None:
        """Gradient . delta at every alpha not computed yet, rows (alpha, answer token), in batches."""
        todo = list(dict.fromkeys(a for a in map(self.key, alphas) if a not in self.points))
        if not todo:
            return
        n, x, x0 = self.n_ans, self.x, self.x0
        alpha_rows = torch.tensor(todo, dtype=torch.float32).repeat_interleave(n)
        ans_rows = torch.arange(n).repeat(len(todo))
        for start in range(0, len(alpha_rows), self.batch):
            sl = slice(start, start + self.batch)
            a = alpha_rows[sl].to(device=x.device, dtype=x.dtype)[:, None, None]
            points = (x0 + a * (x - x0)).detach().requires_grad_(True)
            with torch.enable_grad():
                f = _objective(_forward_embeds(self.model, points, self.enc, self.keep), self.tgt_pos[ans_rows[sl]],
                               self.tgt_ids[ans_rows[sl]], self.objective)
                (grad,) = torch.autograd.grad(f.sum(), points)
            dots = (grad.float() * self.delta[None]).sum(-1).cpu()  # [rows, T]
            for row, value in zip(range(start, start + dots.shape[0]), dots):
                self.points.setdefault(todo[row // n], torch.zeros(n, x.shape[0]))[int(ans_rows[row])] = value

    def store(self, alpha: float, answer: int, value: torch.Tensor) -> None:
        """Keep one computed point (gradient . delta of `answer` at `alpha`, [T])."""
        self.points.setdefault(self.key(alpha), torch.zeros(self.n_ans, self.x.shape[0]))[answer] = value

    def attributions(self, method: str, steps: int) -> torch.Tensor:
        """[n_answer, T]: the rule's weighted sum of the points (computing the missing ones)."""
        sizes, alphas = quadrature(method, steps)
        self.compute(alphas)
        return sum(size * self.points[self.key(a)] for size, a in zip(sizes, alphas))

    @torch.no_grad()
    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """f(baseline), f(input) per answer token."""
        n = self.n_ans
        ends = _objective(_forward_embeds(self.model, torch.stack([self.x0, self.x]).repeat_interleave(n, 0), self.enc,
                                          self.keep), self.tgt_pos.repeat(2), self.tgt_ids.repeat(2), self.objective)
        ends = ends.view(2, n).cpu()
        return ends[0], ends[1]


def relative_gap(attributions: torch.Tensor, f_baseline: torch.Tensor, f_input: torch.Tensor) -> float:
    """The largest |sum of attributions - (f(input) - f(baseline))| / |f(input) - f(baseline)| over answer tokens."""
    delta = f_input - f_baseline
    return float(((attributions.sum(-1) - delta).abs() / delta.abs().clamp_min(1e-12)).max())


def integrated_gradients(model: Any, enc: Encoded, *, steps: int = 20, baseline: str = "zero", method: str = "gausslegendre",
                         objective: str = "prob", internal_batch_size: int = 64, max_steps: int | None = None,
                         tolerance: float = 0.05) -> dict[str, Any]:
    """IG of each answer token w.r.t. the input embeddings: `attributions` [n_answer, T] and the endpoints.

    Rows of the batch are (step, answer token) pairs, so every answer token gets its own gradient in the
    same backward. With `max_steps` above `steps`, the steps double while the completeness gap exceeds
    `tolerance` (relative) and the doubled count stays within `max_steps`, reusing the points the rules
    share. Also returns `f_input`, `f_baseline` ([n_answer]), `steps` (the count used), `points` (gradients
    computed) and `history` ([(steps, relative gap)]).
    """
    path = PathIntegral(model, enc, baseline=baseline, objective=objective, internal_batch_size=internal_batch_size)
    f_baseline, f_input = path.endpoints()
    history = []
    while True:
        attributions = path.attributions(method, steps)
        history.append((steps, relative_gap(attributions, f_baseline, f_input)))
        gap = history[-1][1]
        if max_steps is None or not np.isfinite(gap) or gap <= tolerance or 2 * steps > max_steps:
            break
        steps *= 2
    return {"attributions": attributions, "f_baseline": f_baseline, "f_input": f_input, "steps": steps,
            "points": len(path.points), "history": history}


def compute_together(model: Any, paths: list[PathIntegral], alphas: list[list[float]], batch: int) -> None:
    """`PathIntegral.compute` of several inputs of a causal model, their rows in shared batches.

    Rows are (input, alpha, answer token), each input's in the order its own `compute` uses. Shorter
    inputs are padded on the right with zero embeddings: a causal model's position never attends to a
    later one, so the padding changes no logit or gradient of the input's own positions. Logits are
    computed at the union of the inputs' answer positions."""
    rows = []
    for k, (path, wanted) in enumerate(zip(paths, alphas)):
        todo = list(dict.fromkeys(a for a in map(path.key, wanted) if a not in path.points))
        rows += [(k, alpha, answer) for alpha in todo for answer in range(path.n_ans)]
    length = max(path.x.shape[0] for path in paths)
    padded = [(torch.nn.functional.pad(path.x0, (0, 0, 0, length - path.x.shape[0])),
               torch.nn.functional.pad(path.x, (0, 0, 0, length - path.x.shape[0]))) for path in paths]
    keep = sorted({p for path in paths for p in path.enc.target_positions})
    first = paths[0]
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        alpha = torch.tensor([a for _, a, _ in chunk], dtype=torch.float32).to(device=first.x.device, dtype=first.x.dtype)
        x0 = torch.stack([padded[k][0] for k, _, _ in chunk])
        x = torch.stack([padded[k][1] for k, _, _ in chunk])
        points = (x0 + alpha[:, None, None] * (x - x0)).detach().requires_grad_(True)
        at = torch.tensor([keep.index(paths[k].enc.target_positions[a]) for k, _, a in chunk], dtype=torch.long)
        ids = torch.tensor([paths[k].enc.target_ids[a] for k, _, a in chunk], dtype=torch.long)
        mask = torch.ones(points.shape[:2], dtype=first.enc.attention_mask.dtype, device=first.enc.attention_mask.device)
        with torch.enable_grad():
            logits = model.run(inputs_embeds=points, attention_mask=mask, keep=keep).logits
            f = _objective(logits, at, ids, first.objective)
            (grad,) = torch.autograd.grad(f.sum(), points)
        grad = grad.float()
        for row, (k, a, answer) in enumerate(chunk):
            n = paths[k].x.shape[0]
            paths[k].store(a, answer, (grad[row, :n] * paths[k].delta).sum(-1).cpu())


def integrated_gradients_many(model: Any, encs: list[Encoded], *, steps: int = 20, baseline: str = "zero",
                              method: str = "gausslegendre", objective: str = "prob", internal_batch_size: int = 64,
                              max_steps: int | None = None, tolerance: float = 0.05) -> list[dict[str, Any]]:
    """`integrated_gradients` of several inputs, each as if alone, their gradients computed in shared batches.

    On a causal model, the rows of inputs with the same number of tokens share batches
    (`compute_together`; padding would only add work, as IG's large passes are bound by compute, not
    by reading the weights); each input's steps double on its own gap as in `integrated_gradients`.
    Other models compute one input at a time."""
    options = {"baseline": baseline, "objective": objective, "internal_batch_size": internal_batch_size}
    if model.kind != "causal":
        return [integrated_gradients(model, enc, steps=steps, method=method, max_steps=max_steps, tolerance=tolerance,
                                     **options) for enc in encs]
    paths = [PathIntegral(model, enc, **options) for enc in encs]
    ends = [path.endpoints() for path in paths]
    counts = [steps] * len(paths)
    history: list[list[tuple[int, float]]] = [[] for _ in paths]
    attributions: list[torch.Tensor | None] = [None] * len(paths)
    active = list(range(len(paths)))
    while active:
        by_length: dict[int, list[int]] = defaultdict(list)  # no padding: IG's passes are compute-bound
        for i in active:
            by_length[paths[i].x.shape[0]].append(i)
        for group in by_length.values():
            compute_together(model, [paths[i] for i in group], [quadrature(method, counts[i])[1] for i in group],
                             internal_batch_size)
        going = []
        for i in active:
            attributions[i] = paths[i].attributions(method, counts[i])
            history[i].append((counts[i], relative_gap(attributions[i], *ends[i])))
            gap = history[i][-1][1]
            if max_steps is None or not np.isfinite(gap) or gap <= tolerance or 2 * counts[i] > max_steps:
                continue
            counts[i] *= 2
            going.append(i)
        active = going
    return [{"attributions": attributions[i], "f_baseline": ends[i][0], "f_input": ends[i][1], "steps": counts[i],
             "points": len(paths[i].points), "history": history[i]} for i in range(len(paths))]


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
