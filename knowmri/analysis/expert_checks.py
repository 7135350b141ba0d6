"""Router interventions for the causal verification of mixture-of-experts localisations.

A result that locates something inside one expert (a neuron carrying `"expert"`, or a site of kind
"expert", e.g. causal tracing's best single expert) is checked through the router
(`blocks.{l}.moe.router`): the expert is dropped (its router logit set to -inf, so the router picks
the next expert instead, with the family's own rule) and forced (its logit raised so every token
runs it) at every position of the prompt. A drop that lowers the fact's P(answer) more than it lowers
unrelated facts' (`neuron_controls.control_prompts`) and more than dropping other experts of the same
layer (`draws` random ones) does is specific to the fact (`neuron_controls.beats`), as for neurons.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from knowmri.analysis.sites import result_sites, site_layer
from knowmri.hooks import site
from knowmri.methods import neuron_controls as nc

#: The router logit added to force an expert (large enough to win top-k in every family).
FORCE_LOGIT = 1e4


def located_expert(findings: dict[str, Any]) -> tuple[int, int] | None:
    """The (layer, expert) a result points at: its best site of kind "expert", else its best specific neuron that
    names an expert; None when it names no expert."""
    for s in result_sites(findings):
        if s.get("kind") == "expert" and s.get("expert") is not None:
            return int(site_layer(s["site"])), int(s["expert"])  # type: ignore[arg-type]
    for n in findings.get("neurons") or []:
        if isinstance(n, dict) and not n.get("generic") and n.get("expert") is not None:
            return int(n["layer"]), int(n["expert"])
    return None


def router_edit(model: Any, layer: int, expert: int, how: str) -> tuple[str, dict[str, Any]]:
    """The `p_answers` edit that drops (router logit -inf) or forces (+FORCE_LOGIT) one expert at every position."""
    delta = torch.zeros(model.n_experts)
    delta[expert] = float("-inf") if how == "drop" else FORCE_LOGIT
    return site(layer, "moe.router"), {"how": "add", "delta": delta}


def verify_expert(model: Any, fact: nc.Prompt, controls: list[nc.Prompt], layer: int, expert: int, seed: int,
                  draws: int, p_answers: Callable[[Any, Any, list], list[float]]) -> dict[str, Any]:
    """Expert `expert` of layer `layer` dropped and forced on the fact, dropped on the control facts, and other
    experts of the layer dropped on the fact (`draws` of them, chosen with a generator seeded with `seed`);
    `p_answers(model, enc, variants)` gives P(answer) under each variant's edits (the verification's)."""
    if layer not in model.moe_layers or not 0 <= expert < model.n_experts:
        raise ValueError(f"expert {expert} of layer {layer} is not an expert of {model.name}")
    gen = torch.Generator().manual_seed(seed)
    others = [e for e in range(model.n_experts) if e != expert]
    picked = [others[int(i)] for i in torch.randperm(len(others), generator=gen)[:draws]]
    drop, force = router_edit(model, layer, expert, "drop"), router_edit(model, layer, expert, "force")
    probs = p_answers(model, fact.enc, [[], [drop], [force], *[[router_edit(model, layer, e, "drop")] for e in picked]])
    base = probs[0]
    random_effects = [nc.relative(p, base) for p in probs[3:]]
    control_effects = []
    for prompt in controls:
        clean, dropped = p_answers(model, prompt.enc, [[], [drop]])
        control_effects.append(nc.relative(dropped, clean))
    own = nc.relative(probs[1], base)
    control = sum(control_effects) / len(control_effects) if control_effects else 0.0
    random_mean = sum(random_effects) / len(random_effects) if random_effects else 0.0
    random_std = nc.spread(random_effects)
    checks = [(-control, 0.0)] if control_effects else []
    checks += [(-random_mean, random_std)] if random_effects else []
    warnings = [] if control_effects else ["no unrelated control facts: dropping the expert is not compared with other facts"]
    return {"located": f"expert {expert} of layer {layer}", "kind": "expert",
            "layer": layer, "expert": expert, "base_prob": base, "ablated": probs[1], "amplified": probs[2],
            "own": own, "own_amplified": nc.relative(probs[2], base), "drop": own,
            "control": control, "control_spread": nc.spread(control_effects), "n_controls": len(control_effects),
            "random": random_mean, "random_std": random_std, "random_draws": len(random_effects),
            "random_drop": random_mean, "random_ablated": base * (1 + random_mean),
            "specificity": -own - max([-control, -random_mean] if control_effects else [-random_mean]),
            "holds": bool(control_effects) and nc.beats(-own, checks), "warnings": warnings}
