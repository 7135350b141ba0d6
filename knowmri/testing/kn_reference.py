"""The straightforward reference of the knowledge-neurons engine (`knowmri.methods.kn_engine.ig_neurons`),
for tests and benchmarks: Dai et al.'s / EleutherAI's per-layer loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from knowmri.hooks import Hooks, site
from knowmri.methods.kn_engine import Job, alphas
from knowmri.models.model import Encoded


def ig_neurons_reference(model: Any, enc: Encoded, jobs: Sequence[Job], *, steps: int, riemann: str = "right") -> torch.Tensor:
    """The straightforward per-layer loop of Dai et al. / EleutherAI (for tests and benchmarks):
    for each job and each layer, a clean forward to read that layer's activation, then `steps`
    scaled copies of the full input in one batch and one backward. Same output as `ig_neurons`."""
    a = alphas(steps, riemann)
    out = torch.zeros(len(jobs), model.n_layers, model.d_mlp)
    for j, (scaled, predict, token) in enumerate(jobs):
        for layer in range(model.n_layers):
            name = site(layer, "mlp.neurons")
            with torch.no_grad(), Hooks(model) as h:
                cap = h.read(name, positions=[scaled])
                model.forward(**enc.inputs())
            base = cap.value[0, 0]
            scaled_acts = (a.to(base.device, base.dtype)[:, None] * base[None, :]).requires_grad_(True)
            with torch.inference_mode(False), torch.enable_grad(), Hooks(model) as h:
                h.replace(name, scaled_acts[:, None, :], positions=[scaled])
                logits = model.forward(**enc.inputs(steps))
                probs = logits[:, predict].float().softmax(-1)[:, token]
                (grad,) = torch.autograd.grad(probs.sum(), scaled_acts)
            out[j, layer] = (grad.float().sum(0) * base.float() / steps).cpu()
    return out
