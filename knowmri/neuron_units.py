"""A layer's neurons as one unit axis, for dense and mixture-of-experts layers alike.

The neuron methods (knowledge neurons, FiNE, their controls, the causal verification, capability
localisation) score a [n_layers, units] grid and name a neuron by (layer, unit). A dense layer's units are
its MLP neurons (`blocks.{l}.mlp.neurons`). A mixture-of-experts layer's units are its experts' neurons
side by side: unit `e * d_expert + u` is neuron u of expert e (`blocks.{l}.moe.experts.{e}.neurons`),
zero at the tokens the router does not send to e. Reads and edits go through each expert's own site,
so only the routed experts are computed, as transformers computes them; an edit skips the experts
it does not touch. `split` turns a unit back into (expert, neuron) for findings, which name a MoE
neuron by `layer`, `expert` and `unit` (within the expert).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from knowmri.hooks import Capture, Edit, Hooks, expert_site, site
from knowmri.models.moe import route

#: make(lo, hi) -> the edit of the units lo..hi-1 (as local indices 0..hi-lo-1 of one site), or None to skip it.
EditMaker = Callable[[int, int], "Edit | None"]


def is_moe(model: Any, layer: int) -> bool:
    """Whether layer `layer` holds experts (its units are expert neurons)."""
    return layer in getattr(model, "moe_layers", ())


def layer_width(model: Any, layer: int) -> int:
    """The units of one layer: its MLP neurons, or every expert's neurons."""
    if is_moe(model, layer):
        return model.n_experts * model.d_expert
    if getattr(model, "moe_layers", ()):
        return int(model.linear_weight(model.component(layer, "mlp_down")).shape[1])
    return model.d_mlp


def width(model: Any) -> int:
    """The unit axis of a [n_layers, units] grid: `d_mlp` for a dense model, the widest layer otherwise."""
    if not getattr(model, "moe_layers", ()):
        return model.d_mlp
    return max(layer_width(model, layer) for layer in range(model.n_layers))


def split(model: Any, layer: int, unit: int) -> tuple[int | None, int]:
    """(expert, neuron within it) of a unit; (None, unit) in a dense layer."""
    if not is_moe(model, layer):
        return None, int(unit)
    expert, local = divmod(int(unit), model.d_expert)
    return expert, local


def join(model: Any, layer: int, expert: int | None, unit: int) -> int:
    """The unit of neuron `unit` of `expert` (or of the MLP, with expert None) in layer `layer`."""
    if expert is None:
        if is_moe(model, layer):
            raise ValueError(f"layer {layer} is a mixture of experts: a neuron there needs its expert")
        return int(unit)
    if not is_moe(model, layer):
        raise ValueError(f"layer {layer} has no experts (a dense layer), but the neuron names expert {expert}")
    if not 0 <= int(expert) < model.n_experts or not 0 <= int(unit) < model.d_expert:
        raise ValueError(f"neuron (layer {layer}, expert {expert}, unit {unit}) is out of range: "
                         f"{model.n_experts} experts of {model.d_expert} neurons")
    return int(expert) * model.d_expert + int(unit)


def fields(model: Any, layer: int, unit: int) -> dict[str, int]:
    """A finding's `unit` (and `expert`, in a mixture-of-experts layer) for a unit of the grid."""
    expert, local = split(model, layer, unit)
    return {"unit": local} if expert is None else {"expert": expert, "unit": local}


def unit_of(model: Any, neuron: dict[str, Any]) -> tuple[int, int]:
    """The grid's (layer, unit) of a finding's neuron ({"layer", "unit"} and, for an expert's, "expert")."""
    layer = int(neuron["layer"])
    expert = neuron.get("expert")
    return layer, join(model, layer, None if expert is None else int(expert), int(neuron["unit"]))


def label(model: Any, layer: int, unit: int) -> str:
    """L3.U17, or L3.E5.U17 for neuron 17 of expert 5."""
    expert, local = split(model, layer, unit)
    return f"L{layer}.U{local}" if expert is None else f"L{layer}.E{expert}.U{local}"


def slices(model: Any, layer: int) -> list[tuple[str, int, int]]:
    """(site, lo, hi): where each part of a layer's unit axis is read and edited."""
    if not is_moe(model, layer):
        return [(site(layer, "mlp.neurons"), 0, layer_width(model, layer))]
    d = model.d_expert
    return [(expert_site(layer, e), e * d, (e + 1) * d) for e in range(model.n_experts)]


class Units:
    """One layer's units as read in a forward pass: `value` is [B, P, width] (experts side by side)."""

    def __init__(self, model: Any, layer: int, parts: list[tuple[Capture, int, int]], router: Capture | None,
                 weighted: bool) -> None:
        self.model, self.layer, self.parts, self.router, self.weighted = model, layer, parts, router, weighted

    @property
    def value(self) -> torch.Tensor:
        first = self.parts[0][0].value
        if len(self.parts) == 1 and self.router is None and first.shape[-1] == width(self.model):
            return first
        out = first.new_zeros(*first.shape[:-1], width(self.model))
        weights = None
        if self.weighted and self.router is not None:
            logits = self.router.value
            flat = logits.reshape(-1, logits.shape[-1])
            w, chosen = route(self.model.component(self.layer, "moe_router"), flat)
            weights = torch.zeros_like(flat).scatter_(1, chosen, w.to(flat.dtype)).view(*logits.shape)
        for k, (cap, lo, hi) in enumerate(self.parts):
            part = cap.value
            if weights is not None:
                part = part * weights[..., k: k + 1].to(part.device, part.dtype)
            out[..., lo:hi] = part.to(out.device)
        return out


def read(h: Hooks, model: Any, layer: int, positions: Any = None, weighted: bool = False) -> Units:
    """Read a layer's units at `positions` (every position if None) in the next forward pass.

    With `weighted`, an expert's neurons are multiplied by the token's routing weight to that expert
    (what its value vectors are scaled by on their way to the residual stream); dense units are as read."""
    parts = [(h.read(name, positions=positions), lo, hi) for name, lo, hi in slices(model, layer)]
    router = h.read(site(layer, "moe.router"), positions=positions) if weighted and is_moe(model, layer) else None
    return Units(model, layer, parts, router, weighted)


def edit(h: Hooks, model: Any, layer: int, make: EditMaker) -> None:
    """Edit a layer's units: `make(lo, hi)` gives the edit of each site's slice lo..hi-1 (None: left alone)."""
    for name, lo, hi in slices(model, layer):
        fn = make(lo, hi)
        if fn is not None:
            h.edit(name, fn)


def value_vectors(model: Any, layer: int, units: Sequence[int] | None = None) -> torch.Tensor:
    """[n, d_model]: what each unit writes (its down projection's column; an expert's before its routing
    weight). All of a layer's units when `units` is None."""
    if not is_moe(model, layer):
        values = model.mlp_value_vectors(layer)
        return values if units is None else values[torch.tensor(list(units), device=values.device)]
    if units is None:
        return torch.cat([model.expert_value_vectors(layer, e) for e in range(model.n_experts)])
    rows = []
    for unit in units:
        expert, local = split(model, layer, unit)
        rows.append(model.expert_value_vectors(layer, expert)[local])
    return torch.stack(rows) if rows else model.expert_value_vectors(layer, 0)[:0]


def value_products(model: Any, layer: int, vectors: torch.Tensor) -> torch.Tensor:
    """[width, n] float32: every unit's value vector dotted with each of `vectors` [n, d_model], an expert at
    a time (no float32 copy of all of a layer's experts at once)."""
    if not is_moe(model, layer):
        values = model.mlp_value_vectors(layer).detach()
        return values.float() @ vectors.to(values.device, torch.float32).T
    out = []
    for e in range(model.n_experts):
        values = model.expert_value_vectors(layer, e).detach()
        out.append(values.float() @ vectors.to(values.device, torch.float32).T)
    return torch.cat(out)
