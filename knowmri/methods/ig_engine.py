"""The integrated-gradients engine (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks"),
owned by `integrated_gradients`: Captum's quadrature rules, the straight path from a baseline to the
input embeddings with its gradients kept per point (so doubling the steps reuses them), the completeness
gap, and the batched run of several inputs of a causal model (`integrated_gradients_many`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from knowmri.models.arch import resolve
from knowmri.models.model import Encoded

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
BASELINES = ("zero", "pad", "noise")


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
