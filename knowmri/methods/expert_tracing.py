"""Causal tracing of single experts (Meng et al. 2022, "Locating and Editing Factual Associations in GPT",
extended to mixture-of-experts layers); `causal_tracing` runs it beside its grids on a MoE model.

ROME restores one state of the clean run in the run whose subject is corrupted and reads how much
of P(answer) comes back. Here the state is one expert's contribution to its MoE block's output
(`blocks.{l}.moe.experts.{e}.out`, its output times its routing weight) at one position: the block's
output in the corrupted run gets expert e's clean contribution in place of its corrupted one
(`mlp.out` += clean_e - corrupted_e). That is defined whether or not the router picks e in either run:
an expert the corrupted run no longer routes to is put back, one it newly routes to is taken out.
Cells where e runs in neither run are the corrupted P. Restorations are single cells (no window).
Cells at one position share batches (one row per cell and noise sample); as the model is causal, the
rows run only positions t..T-1, over the key/value cache of the corrupted prefix (whole prompts where
the model's cache cannot be repeated over rows).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from knowmri.hooks import Hooks, expert_site, site
from knowmri.sample import Span


@dataclass
class ExpertTrace:
    """P(answer) with one expert's contribution restored: `grid` [positions, layers, n_experts] (mean over noise
    samples; the corrupted P where a layer is dense), `samples` [positions, layers, n_experts, S], and whether
    each expert ran at each cell in the clean run (`clean_routed`, [positions, layers, n_experts])."""

    positions: list[int]
    grid: torch.Tensor
    samples: torch.Tensor
    clean_routed: torch.Tensor
    low: float


def _expert_outs(model: Any, input_ids: torch.Tensor, positions: list[int], noise: torch.Tensor | None,
                 subject: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every MoE layer's experts' contributions at `positions`, [B, P, L, E, d] (zero where an expert does not
    run or the layer is dense), and the logits at the last position [B, vocab]."""
    L, E = model.n_layers, model.n_experts
    rows = 1 if noise is None else noise.shape[0]
    with torch.no_grad(), Hooks(model) as h:
        if noise is not None:
            h.add("embed", noise, positions=list(subject))
        caps = {(layer, e): h.read(expert_site(layer, e, "out"), positions=positions)
                for layer in model.moe_layers for e in range(E)}
        logits = model.forward(input_ids=input_ids.repeat(rows, 1), attention_mask=torch.ones_like(input_ids).repeat(rows, 1))
    out = torch.zeros(rows, len(positions), L, E, model.d_model)
    for (layer, e), cap in caps.items():
        out[:, :, layer, e] = cap.value.float().cpu()
    return out, logits[:, -1]


def _corrupted_prefix(model: Any, input_ids: torch.Tensor, t: int, noise: torch.Tensor, subject: list[int]) -> Any:
    """The key/value cache of the corrupted run over positions 0..t-1 (one row per noise sample), or None when
    there is no prefix or the model's cache cannot be repeated over rows."""
    if t == 0:
        return None
    S = noise.shape[0]
    kept = [k for k, q in enumerate(subject) if q < t]
    with torch.no_grad(), Hooks(model) as h:
        if kept:
            h.add("embed", noise[:, kept], positions=[subject[k] for k in kept])
        out = model.run(input_ids=input_ids[:, :t].repeat(S, 1), attention_mask=torch.ones_like(input_ids[:, :t]).repeat(S, 1),
                        use_cache=True, keep=1)
    cache = model.output_cache(out)
    return cache if hasattr(cache, "batch_repeat_interleave") else None


def trace_experts(model: Any, input_ids: torch.Tensor, position: int, answer: int, subject: Span, noise: torch.Tensor,
                  positions: Sequence[int], batch_size: int = 128,
                  progress: Callable[[float, str], None] | None = None, suffix: bool = True) -> ExpertTrace:
    """P(answer) at `position` (the last input position) with each expert's clean contribution restored at each
    of `positions`, in the run whose subject embeddings get `noise` [S, len(subject), d_model]; `suffix` runs
    the rows over the corrupted prefix's cache (the same result, less work)."""
    if position != input_ids.shape[1] - 1:
        raise ValueError("single experts are traced at the last position of a causal model only")
    L, E, S = model.n_layers, model.n_experts, noise.shape[0]
    pos = list(positions)
    subj = list(subject)
    clean, _ = _expert_outs(model, input_ids, pos, None, subj)
    corrupt, corrupt_logits = _expert_outs(model, input_ids, pos, noise, subj)
    low_samples = corrupt_logits.float().softmax(-1)[:, answer].cpu()
    low = float(low_samples.mean())
    samples = low_samples.expand(len(pos), L, E, S).clone()
    clean_routed = clean[0].abs().sum(-1) > 0  # [P, L, E]
    ran = clean_routed | (corrupt.abs().sum(-1) > 0).any(0)
    cells = [(i, layer, e) for i in range(len(pos)) for layer in model.moe_layers for e in range(E) if ran[i, layer, e]]
    per_batch = max(1, batch_size // S)
    device = model.embed_module.weight.device
    done = 0
    for i, t in enumerate(pos):
        prefix = _corrupted_prefix(model, input_ids, t, noise, subj) if suffix else None
        first = t if prefix is not None else 0
        kept = [k for k, q in enumerate(subj) if q >= first]  # subject positions the rows feed
        mine = [c for c in cells if c[0] == i]
        for start in range(0, len(mine), per_batch):
            chunk = mine[start:start + per_batch]
            n = len(chunk) * S  # row s * len(chunk) + k: noise sample s, cell k (the cache's row order)
            cache = None
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(chunk))
            with torch.no_grad(), Hooks(model) as h:
                if kept:
                    h.add("embed", noise[:, kept].repeat_interleave(len(chunk), 0), positions=[subj[k] - first for k in kept])
                for k, (_, layer, e) in enumerate(chunk):
                    delta = (clean[0, i, layer, e][None] - corrupt[:, i, layer, e]).to(device)  # [S, d]
                    h.add(site(layer, "mlp.out"), delta[:, None, :], rows=[s * len(chunk) + k for s in range(S)],
                          positions=[t - first])
                out = model.run(input_ids=input_ids[:, first:].repeat(n, 1),
                                attention_mask=torch.ones_like(input_ids).repeat(n, 1), cache=cache, keep=1)
            probs = out.logits[:, -1].float().softmax(-1)[:, answer].cpu().view(S, len(chunk))
            for k, (_, layer, e) in enumerate(chunk):
                samples[i, layer, e] = probs[:, k]
            done += len(chunk)
            if progress is not None:
                progress(done / len(cells), "experts")
    return ExpertTrace(positions=pos, grid=samples.mean(-1), samples=samples, clean_routed=clean_routed, low=low)


def expert_findings(trace: ExpertTrace, tokens: Sequence[str], top: int = 10) -> dict[str, Any]:
    """The findings of an expert trace: each cell's effect (P restored - corrupted P), the best cells and the peak
    (layer, expert, position) with a normal-approximation 95% interval over the noise samples."""
    effect = trace.grid - trace.low
    S = trace.samples.shape[-1]
    se = trace.samples.std(-1) / S ** 0.5 if S > 1 else torch.zeros_like(trace.grid)
    order = effect.flatten().argsort(descending=True)[:top].tolist()
    _, L, E = effect.shape
    cells = []
    for flat in order:
        i, rest = divmod(flat, L * E)
        layer, e = divmod(rest, E)
        value = float(effect[i, layer, e])
        cells.append({"layer": layer, "expert": e, "position": trace.positions[i], "token": tokens[trace.positions[i]],
                      "score": value, "stderr": float(se[i, layer, e]), "routed": bool(trace.clean_routed[i, layer, e]),
                      "ci": [value - 1.96 * float(se[i, layer, e]), value + 1.96 * float(se[i, layer, e])]})
    return {"positions": trace.positions, "tokens": [tokens[p] for p in trace.positions],
            "grid": trace.grid.tolist(), "low": trace.low, "top": cells, "peak": cells[0] if cells else None}
