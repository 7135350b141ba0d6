"""Causal verification of the methods' localisations: ablate, and amplify, what a method located, on the
fact and against controls, and say whether the effect is specific to what was found.

Neurons (every result whose findings carry `neurons`; generic ones, flagged `"generic": true`, are left
out): the top `k` are zeroed (and doubled) at every position, on the fact and on unrelated control facts
(other relations, subjects and answers: `knowmri.data.relations.controls_for`), and random units of the
same layers and count are zeroed on the fact (`draws` draws, with their spread). This is Dai et al.'s
check of knowledge neurons (2022, "Knowledge Neurons in Pretrained Transformers": suppressing a
relation's neurons lowers its facts' probability far more than other relations'). A neuron set holds up
when its own drop clearly beats both controls (`neuron_controls.beats`): at least 10%, over twice the
unrelated facts' drop and the random units' (and the random mean plus two spreads).

Sites (every result carrying `sites`; the best one): the site is zeroed (and doubled) over the window of
layers the method traced it with (the site's `window`, e.g. causal tracing's MLP window centred like
ROME, Meng et al. 2022), at its position. The controls are the same window at other positions (not the
first or last) and windows of as many layers elsewhere at the same position, `draws` draws each.

Experts (a neuron that names its `expert`, or a site of kind "expert"; mixture-of-experts models only): the
expert is dropped and forced through its layer's router (`knowmri.analysis.expert_checks`), on the fact,
on the control facts and against other experts of the layer dropped.

All changes are relative changes of P(first answer token). Warnings (a fact the model hardly gives,
too few control facts, no control available) go with the outcome and its verdict.
"""

from __future__ import annotations

from typing import Any

import torch

from knowmri import neuron_units
from knowmri.analysis.expert_checks import located_expert, verify_expert
from knowmri.analysis.sites import describe_site, result_sites, site_layer
from knowmri.hooks import Hooks
from knowmri.methods import neuron_controls as nc
from knowmri.methods.common import answer_prob, prepare

Edits = list[tuple[str, dict[str, Any]]]


def located_neurons(findings: dict[str, Any], k: int, model: Any = None) -> list[tuple[int, int]]:
    """The top `k` (layer, unit) of `findings["neurons"]`, generic neurons left out; a neuron that names its
    expert is unit `expert * d_expert + unit` of its layer (`knowmri.neuron_units`, which needs the `model`)."""
    return [(int(x["layer"]), int(x["unit"])) if x.get("expert") is None else neuron_units.unit_of(model, x)
            for x in findings.get("neurons") or [] if not x.get("generic")][:k]


def verify_localisations(results: dict[str, Any], model: Any, sample: Any, seed: int = 0, k: int = 5, draws: int = 5,
                         controls: int = 8) -> dict[str, Any] | None:
    """Each localisation's check (keyed by the result's name), with the clean P(answer); None when nothing is located.

    `results` maps a name to a successful `MethodResult`; neuron sets and sites are read from its findings
    (see the module doc). Random draws come from generators seeded with `seed` per check, so a check does
    not depend on which other methods ran."""
    sets = {name: located for name, r in results.items() if (located := located_neurons(r.findings, k, model))}
    site_results = {name: result_sites(r.findings)[0] for name, r in results.items() if result_sites(r.findings)}
    experts = {name: where for name, r in results.items()
               if getattr(model, "moe_layers", ()) and (where := located_expert(r.findings))}
    if not sets and not site_results and not experts:
        return None
    prep = prepare(model, sample)
    fact = nc.encode_prompt(model, prep.prompt, prep.answer)
    control = nc.control_prompts(model, sample, controls, prep.answer) if sets or experts else []
    checks: dict[str, dict[str, Any]] = {}
    if sets:
        for name, spec in nc.specificities(model, fact, control, sets, draws, seed).items():
            checks[name] = {"located": f"top {len(sets[name])} neurons", "kind": "neurons", **spec,
                            "drop": spec["own"], "random_drop": spec["random"], "control_drop": spec["control"]}
    base = p_answers(model, prep.enc, [[]])[0]
    for name, chosen in site_results.items():
        checks[name if name not in checks else f"{name} site"] = verify_site(model, prep.enc, chosen, seed, draws)
    for name, (layer, expert) in experts.items():
        checks[f"{name} expert"] = verify_expert(model, fact, control, layer, expert, seed, draws, p_answers)
    warnings = nc.control_warnings(base, len(control), controls) if sets or experts else nc.control_warnings(base, 1, 1)
    return {"base_prob": base, "controls": [c.text for c in control], "n_controls": len(control), "draws": draws,
            "warnings": warnings, "methods": checks}


def verify_site(model: Any, enc: Any, chosen: dict[str, Any], seed: int, draws: int) -> dict[str, Any]:
    """A site zeroed (and doubled) over its traced window of layers at its position, against the same window
    at other positions and same-size windows of other layers at its position (`draws` each)."""
    from knowmri.methods.tracing_engine import window_layers

    gen = torch.Generator().manual_seed(seed)
    name, position = chosen["site"], int(chosen["position"])
    layer, kind = site_layer(name), name.split(".", 2)[2]
    size = max(1, int(chosen.get("window") or 1))
    layers = list(window_layers(layer, size, model.n_layers)) if size > 1 else [layer]
    length = int(enc.read_ids.shape[1])
    last = enc.pred_pos % length
    others = [q for q in range(1, length) if q not in (position, last)]
    positions = [others[int(i)] for i in torch.randperm(len(others), generator=gen)[:draws]] if others else []
    starts = [s for s in range(0, model.n_layers - len(layers) + 1) if s + len(layers) <= layers[0] or s >= layers[-1] + 1]
    shifted = [starts[int(i)] for i in torch.randperm(len(starts), generator=gen)[:draws]] if starts else []

    def window(at: int, lays: list[int], how: str) -> Edits:
        kw: dict[str, Any] = {"how": "ablate"} if how == "ablate" else {"how": "scale", "factor": 2.0}
        return [(f"blocks.{lay}.{kind}", {**kw, "positions": [at]}) for lay in lays]

    variants = [[], window(position, layers, "ablate"), window(position, layers, "amplify")]
    variants += [window(q, layers, "ablate") for q in positions]
    variants += [window(position, list(range(s, s + len(layers))), "ablate") for s in shifted]
    probs = p_answers(model, enc, variants)
    base = probs[0]
    own = nc.relative(probs[1], base)
    token_effects = [nc.relative(p, base) for p in probs[3:3 + len(positions)]]
    layer_effects = [nc.relative(p, base) for p in probs[3 + len(positions):]]
    controls = [(-mean(xs), nc.spread(xs)) for xs in (token_effects, layer_effects) if xs]
    what = describe_site(chosen) + (f" (window of {len(layers)} layers: {layers[0]}-{layers[-1]})" if len(layers) > 1 else "")
    warnings = [] if controls else ["no other position or layer window to compare the site with: the check is uncontrolled"]
    return {"located": what, "kind": "site", "window": len(layers), "base_prob": base, "ablated": probs[1],
            "amplified": probs[2], "own": own, "own_amplified": nc.relative(probs[2], base), "drop": own,
            "random": mean(token_effects), "random_std": nc.spread(token_effects), "random_draws": len(token_effects),
            "random_drop": mean(token_effects), "random_ablated": base * (1 + mean(token_effects)),
            "layer_control": mean(layer_effects), "layer_control_std": nc.spread(layer_effects),
            "layer_draws": len(layer_effects),
            "specificity": -own - max([m for m, _ in controls] or [0.0]),
            "holds": bool(controls) and nc.beats(-own, controls), "warnings": warnings}


def mean(xs: list[float]) -> float:
    """The mean of a list (0 when empty)."""
    return sum(xs) / len(xs) if xs else 0.0


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:+.1%}"


def verification_table(verification: dict[str, Any]) -> dict[str, Any]:
    """The consensus table of a `verify` outcome."""
    base = verification["base_prob"]
    rows = []
    for n, c in verification["methods"].items():
        unrelated = _pct(c.get("control")) if c["kind"] in ("neurons", "expert") else f"{_pct(c.get('layer_control'))} (other layers)"
        rows.append([n, c["located"], round(base, 4), round(c["ablated"], 4), round(c["amplified"], 4), _pct(c["own"]),
                     unrelated, f"{_pct(c['random'])} ± {c['random_std']:.1%}", round(c["specificity"], 3),
                     "yes" if c["holds"] else "NO"])
    return {"name": "Causal verification: P(answer) when the located units are ablated / amplified (x2), against "
                    "controls (unrelated facts; random units or other positions, mean ± spread over draws)",
            "columns": ["method", "located", "P clean", "P ablated", "P amplified", "change", "unrelated facts' change",
                        "random control's change", "specificity", "holds up"],
            "rows": rows}


def verification_verdict(verification: dict[str, Any]) -> str:
    """One sentence per check: its effect size against its controls, and whether it holds up; then the caveats."""
    parts = []
    for n, c in verification["methods"].items():
        if c["kind"] == "neurons":
            against = (f"unrelated facts {c['control']:+.0%} (n={c['n_controls']}), random units {c['random']:+.0%} "
                       f"± {c['random_std']:.0%}")
        elif c["kind"] == "expert":
            against = (f"unrelated facts {c['control']:+.0%} (n={c['n_controls']}), other experts of the layer dropped "
                       f"{c['random']:+.0%} ± {c['random_std']:.0%}; forcing it {c['own_amplified']:+.0%}")
        else:
            against = (f"the same window at other tokens {c['random']:+.0%} ± {c['random_std']:.0%}, other layers "
                       f"{c['layer_control']:+.0%} ± {c['layer_control_std']:.0%}")
        how = "when the router drops it" if c["kind"] == "expert" else "when ablated"
        parts.append(f"{n} ({c['located']}) {c['own']:+.0%} {how} vs {against}: "
                     + ("holds up" if c["holds"] else "does not hold up"))
    caveats = list(verification.get("warnings") or []) + [w for c in verification["methods"].values() for w in c.get("warnings") or []]
    return "Causal check: " + "; ".join(parts) + "." + "".join(f" Caveat: {w}." for w in caveats)


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
