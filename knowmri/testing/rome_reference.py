"""The reference for causal tracing: ROME's straightforward per-(token, layer) loop.

A faithful reimplementation of `trace_with_patch` from Meng et al. 2022, "Locating and Editing
Factual Associations in GPT" (ROME, `experiments/causal_trace.py`), over knowmri's hooks: one
forward per (token, layer) cell, with a clean row 0 and `samples` noised rows, the clean state
copied into the noised rows at that cell, full logits, P(answer) averaged over the noised rows.
Tests check that knowmri's batched engine gives the same grids; `benchmarks/bench_causal_tracing.py`
times the two against each other.
"""

from __future__ import annotations

from typing import Any

import torch

from knowmri.hooks import Hooks, site
from knowmri.methods.common import prepare
from knowmri.methods.tracing_engine import KIND_SITES, subject_noise, window_layers
from knowmri.methods.weight_cache import embedding_std
from knowmri.sample import Sample, Span


@torch.inference_mode()
def rome_trace(model: Any, input_ids: torch.Tensor, position: int, answer: int, subject: Span, noise: torch.Tensor,
               kinds: list[str], window: int) -> tuple[float, dict[str, torch.Tensor]]:
    """ROME's per-(token, layer) loop: the corrupted P(answer) and the grids [tokens, layers] per kind."""
    samples, n_layers, n_tokens = noise.shape[0], model.n_layers, input_ids.shape[1]
    inp = input_ids.repeat(samples + 1, 1)
    mask = torch.ones_like(inp)

    def trace_with_patch(states: list[tuple[int, str]]) -> float:
        with Hooks(model) as h:
            def add_noise(x: torch.Tensor) -> torch.Tensor:
                x = x.clone()
                x[1:, subject.start:subject.stop] += noise.to(x)
                return x

            h.edit("embed", add_noise)
            for t, name in states:
                def patch(x: torch.Tensor, t: int = t) -> torch.Tensor:
                    x = x.clone()
                    x[1:, t] = x[0, t]
                    return x

                h.edit(name, patch)
            logits = model.forward(input_ids=inp, attention_mask=mask)
        return float(logits[1:, position].float().softmax(-1).mean(0)[answer])

    low = trace_with_patch([])
    grids = {}
    for kind in kinds:
        grid = torch.zeros(n_tokens, n_layers)
        for t in range(n_tokens):
            for layer in range(n_layers):
                layers = [layer] if kind == "hidden" else list(window_layers(layer, window, n_layers))
                grid[t, layer] = trace_with_patch([(t, site(j, KIND_SITES[kind])) for j in layers])
        grids[kind] = grid
    return low, grids


def rome_inputs(model: Any, sample: Sample, samples: int, noise: float, seed: int) -> dict[str, Any]:
    """The inputs knowmri's causal_tracing uses for `sample` (same tokens, answer, subject and noise)."""
    prep = prepare(model, sample, need_subject=True)
    enc = prep.enc
    n_tok = enc.prompt_len if model.kind == "causal" else enc.input_ids.shape[1]
    scaled = subject_noise(model, samples, len(prep.subject), noise * embedding_std(model), seed)
    return {"input_ids": enc.input_ids[:, :n_tok], "position": enc.pred_pos, "answer": enc.target_ids[0],
            "subject": prep.subject, "noise": scaled}
