"""Causal verification of the methods' localisations: ablate, and amplify, what a method located and
compare the change in P(answer) with ablating random units of the same layers.

The check of knowledge neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers":
suppressing the located neurons lowers the fact's probability, amplifying them raises it) and of
causal tracing's sites (Meng et al. 2022, ROME: the decisive MLP state), applied to every result by
what its findings carry: `neurons` (the top `k`, zeroed or doubled at every position) and `sites` (the
best one, zeroed or doubled at its position; the control zeroes a random 5% of that layer's MLP
neurons there). A localisation holds up when ablating it lowers P(answer) by more than twice what the
random control does, and by at least 2%.
"""

from __future__ import annotations

from typing import Any

import torch

from knowmri.analysis.sites import describe_site, result_sites, site_layer
from knowmri.hooks import Hooks
from knowmri.methods.common import answer_prob, prepare

Edits = list[tuple[str, dict[str, Any]]]


def verify_localisations(results: dict[str, Any], model: Any, sample: Any, seed: int = 0, k: int = 5, draws: int = 5) -> dict[str, Any] | None:
    """Each localisation's check (keyed by the result's name), with the clean P(answer); None when nothing is located.

    `results` maps a name to a successful `MethodResult`. Every result whose findings carry `neurons`
    gets its top `k` neurons checked, every result carrying `sites` its best site; each random
    control (`draws` draws) comes from its own generator seeded with `seed`, so a check does not
    depend on which other methods ran.
    """
    enc = prepare(model, sample).enc
    variants: list[Edits] = [[]]  # row 0: no edit
    plans: dict[str, tuple[str, int]] = {}  # name -> (what was located, first row of its 2 + draws variants)
    for name, r in results.items():
        if not r.findings.get("neurons"):
            continue
        gen = torch.Generator().manual_seed(seed)
        located = [(int(x["layer"]), int(x["unit"])) for x in r.findings["neurons"][:k]]
        plans[name] = (f"top {len(located)} neurons", len(variants))
        variants += [neuron_edits(located, "ablate"), neuron_edits(located, "amplify")]
        for _ in range(draws):
            randoms = [(layer, int(torch.randint(model.d_mlp, (1,), generator=gen))) for layer, _ in located]
            variants.append(neuron_edits(randoms, "ablate"))
    for name, r in results.items():
        sites = result_sites(r.findings)
        if not sites:
            continue
        gen = torch.Generator().manual_seed(seed)
        site, position = sites[0]["site"], sites[0]["position"]
        layer = site_layer(site)
        plans[name if name not in plans else f"{name} site"] = (describe_site(sites[0]), len(variants))
        variants += [[(site, {"how": "ablate", "positions": [position]})],
                     [(site, {"how": "scale", "factor": 2.0, "positions": [position]})]]
        for _ in range(draws):
            units = torch.randperm(model.d_mlp, generator=gen)[: max(1, model.d_mlp // 20)].tolist()
            variants.append([(f"blocks.{layer}.mlp.neurons", {"how": "ablate", "units": units, "positions": [position]})])
    if not plans:
        return None
    probs = p_answers(model, enc, variants)
    base = probs[0]
    checks = {}
    for name, (what, i) in plans.items():
        rand = probs[i + 2:i + 2 + draws]
        checks[name] = judge(base, probs[i], probs[i + 1], sum(rand) / len(rand), what)
    return {"base_prob": base, "methods": checks}


def verification_table(verification: dict[str, Any]) -> dict[str, Any]:
    """The consensus table of a `verify` outcome."""
    base = verification["base_prob"]
    rows = [[n, c["located"], round(base, 4), round(c["ablated"], 4), round(c["amplified"], 4), round(c["random_ablated"], 4),
             "yes" if c["holds"] else "NO"] for n, c in verification["methods"].items()]
    return {"name": "Causal verification: P(answer) when the located units are ablated / amplified (x2)",
            "columns": ["method", "located", "P clean", "P ablated", "P amplified", "P random ablated", "holds up"],
            "rows": rows}


def verification_verdict(verification: dict[str, Any]) -> str:
    """One sentence: each localisation's change when ablated, and which do not hold up."""
    checks = verification["methods"]
    weak = [n for n, c in checks.items() if not c["holds"]]
    return ("Causal check: " + ", ".join(f"{n} {c['drop']:+.0%}" for n, c in checks.items()) + " change when ablated"
            + (f"; the localisation of {', '.join(weak)} does not hold up (no larger effect than random)." if weak else
               "; every localisation beats random."))


@torch.inference_mode()
def p_answers(model: Any, enc: Any, variants: list[Edits], batch: int = 32) -> list[float]:
    """P(answer) under each variant's edits, the variants as rows of a few batched forwards."""
    out: list[float] = []
    for start in range(0, len(variants), batch):
        chunk = variants[start:start + batch]
        with Hooks(model) as h:
            for row, edits in enumerate(chunk):
                for name, kwargs in edits:
                    kwargs = dict(kwargs)
                    how = kwargs.pop("how")
                    getattr(h, how)(name, rows=[row], **kwargs)
            logits = model.forward(**enc.inputs(len(chunk)))
        out += [float(p) for p in answer_prob(logits, enc)]
    return out


def neuron_edits(neurons: list[tuple[int, int]], how: str, factor: float = 2.0) -> Edits:
    """Hook edits that ablate (or scale by `factor`) the given (layer, unit) MLP neurons."""
    by_layer: dict[int, list[int]] = {}
    for layer, unit in neurons:
        by_layer.setdefault(layer, []).append(unit)
    edits = []
    for layer, units in by_layer.items():
        kw: dict[str, Any] = {"how": "ablate" if how == "ablate" else "scale", "units": units}
        if how != "ablate":
            kw["factor"] = factor
        edits.append((f"blocks.{layer}.mlp.neurons", kw))
    return edits


def judge(base: float, ablated: float, amplified: float, random_ablated: float, what: str) -> dict[str, Any]:
    """One check's entry: the probabilities, the relative drops, and whether the localisation holds up."""
    drop = (ablated - base) / base if base > 0 else 0.0
    random_drop = (random_ablated - base) / base if base > 0 else 0.0
    holds = (base - ablated) > max(2 * (base - random_ablated), 0.02 * base)
    return {"located": what, "ablated": ablated, "amplified": amplified, "random_ablated": random_ablated,
            "drop": drop, "random_drop": random_drop, "holds": bool(holds)}
