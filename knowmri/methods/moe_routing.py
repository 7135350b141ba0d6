"""MoE routing read-out: which experts each layer's router sends the subject and the last token to.

For a mixture-of-experts model (Shazeer et al. 2017, "Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer"; Jiang et al. 2024, "Mixtral of Experts"), one clean pass
reads every MoE layer's router logits (`blocks.{l}.moe.router`) at the subject's last token and at
the answer-predicting position, and lists the experts the router chooses there (the family's own
selection rule, `knowmri.models.moe.route`) with their router probabilities (softmax of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.hooks import Hooks, site
from knowmri.methods.base import Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import prepare
from knowmri.models.moe import route
from knowmri.report import figures
from knowmri.sample import Sample


@dataclass
class MoeRoutingParams(Params):
    top_n: int = field(default=0, metadata={"help": "experts listed per token and layer (0: the ones routed to)"})

    def validate(self) -> None:
        if not 0 <= self.top_n <= 256:
            raise ValueError("top_n must be between 0 and 256")


@register_method
class MoeRouting(Method):
    name = "moe_routing"
    title = "MoE routing"
    path = ("Internal", "Module", "Experts")
    paper = "Shazeer et al. 2017, 'Outrageously Large Neural Networks'; Jiang et al. 2024, 'Mixtral of Experts'"
    description = "Which experts each layer's router picks for the subject's last token and the last token."
    requires_keys = ("prompt",)
    requires_capabilities = ("moe",)
    Params = MoeRoutingParams

    @torch.inference_mode()
    def run(self, model: Any, sample: Sample, params: MoeRoutingParams, ctx: RunContext) -> MethodResult:
        prep = prepare(model, sample, ctx=ctx)
        enc = prep.enc
        tokens = {"last": enc.pred_pos}
        if prep.subject is not None:
            tokens = {"subject": prep.subject.stop - 1, **tokens}
        layers = list(model.moe_layers)
        with Hooks(model) as h:
            caps = {layer: h.read(site(layer, "moe.router"), positions=list(tokens.values())) for layer in layers}
            model.forward(**enc.inputs())
        routing, probs_grid = [], {role: [] for role in tokens}
        for layer in layers:
            logits = caps[layer].value[0].float()  # [roles, n_experts]
            probs = logits.softmax(-1)
            _, chosen = route(model.component(layer, "moe_router"), caps[layer].value[0])
            entry: dict[str, Any] = {"layer": layer}
            for i, role in enumerate(tokens):
                picked = chosen[i].tolist()
                order = sorted(picked, key=lambda e: -float(probs[i, e]))
                if params.top_n:
                    order = probs[i].argsort(descending=True)[: params.top_n].tolist()
                entry[role] = [{"expert": int(e), "prob": float(probs[i, e]), "routed": int(e) in picked} for e in order]
                probs_grid[role].append(probs[i].tolist())
            routing.append(entry)
        result = self.new_result(params)
        result.findings = {
            "n_experts": model.n_experts, "experts_per_token": model.experts_per_token,
            "positions": tokens, "tokens": {role: prep.tokens[p] for role, p in tokens.items()}, "routing": routing,
        }
        shared = []
        if "subject" in tokens:
            shared = [r["layer"] for r in routing
                      if {e["expert"] for e in r["subject"] if e["routed"]} & {e["expert"] for e in r["last"] if e["routed"]}]

        def names(entry: dict[str, Any], role: str) -> str:
            return ", ".join(f"E{e['expert']}" for e in entry[role] if e["routed"])

        text = f"Each token goes to {model.experts_per_token} of {model.n_experts} experts per layer."
        if routing:  # per token, the layer whose router is most decided (its top expert's probability)
            parts = []
            for role, p in tokens.items():
                best = max(routing, key=lambda r, role=role: r[role][0]["prob"])
                parts.append(f"the {role} token ({prep.tokens[p]!r}) most decidedly to E{best[role][0]['expert']} "
                             f"(p={best[role][0]['prob']:.2f}, with {names(best, role)}) in layer {best['layer']}")
            text += " The router sends " + "; ".join(parts)
        if "subject" in tokens:
            text += f"; subject and last token share an expert in {len(shared)} of {len(routing)} MoE layers."
        result.summary = text + ("" if text.endswith(".") else ".")
        for role, p in tokens.items():
            result.add_figure(f"Router probabilities at the {role} token", figures.heatmap(
                probs_grid[role], x=[f"E{e}" for e in range(model.n_experts)], y=layers,
                title=f"Router probabilities at the {role} token ({prep.tokens[p]!r})", x_title="expert",
                y_title="layer", colorbar="p"))
        result.add_table("Routing per layer", ["layer", *[f"{role} experts" for role in tokens]],
                         [[r["layer"], *[", ".join(f"E{e['expert']} ({e['prob']:.2f})" for e in r[role] if e["routed"])
                                         for role in tokens]] for r in routing])
        return result
