"""Controls for neuron localisations, shared by knowledge_neurons, fine and the causal verification:
unrelated facts the model is asked about, P(answer) of several prompts under neuron edits in a few
batched forwards, and the generic-neuron screen.

A neuron that is a fact's knowledge neuron should matter to that fact and not to unrelated ones:
Dai et al. 2022 ("Knowledge Neurons in Pretrained Transformers") compare the effect of suppressing a
relation's neurons on its own facts (intra-relation) with the effect on other relations' facts
(inter-relation). On real models, attribution also finds generic neurons (massive-activation or
sink-like units that every prediction leans on): ablating one lowers P(answer) of unrelated facts about
as much as of the fact. `screen` measures each candidate neuron's effect on the fact and on the control
facts (one batch row per neuron and prompt) and flags those as generic; `specificity` does the same for
a whole located set and compares it with random units of the same layers.

Effects are relative changes of P(first answer token): (P_edited - P_clean) / P_clean, so -0.3 is a
30% drop. Edits act at every position (as Dai et al. suppress neurons).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from knowmri import neuron_units
from knowmri.hooks import Hooks
from knowmri.models.model import Encoded

#: layer -> [(unit, factor)]: a factor of 0 ablates the unit, 2 doubles it.
NeuronEdit = dict[int, list[tuple[int, float]]]
Row = tuple[int, NeuronEdit]  # (prompt index, its edit)

#: A neuron whose ablation lowers unrelated facts' P(answer) by at least this share of what it does to
#: the fact (and by at least `GENERIC_FLOOR` on average) is generic.
GENERIC_RATIO = 0.5
GENERIC_FLOOR = 0.02
#: Below this P(answer) the model does not know the fact (a warning, not a silent verdict).
KNOWN_FLOOR = 0.02
#: Fewer control facts than this make the unrelated-fact effect a rough estimate (a warning).
MIN_CONTROLS = 4


@dataclass
class Prompt:
    """One encoded prompt and its answer, cut after the position predicting the first answer token."""

    text: str
    answer: str
    enc: Encoded


def encode_prompt(model: Any, prompt: str, answer: str) -> Prompt:
    """`prompt` encoded with `answer` teacher forced (its first token is the one scored)."""
    return Prompt(prompt, answer, model.encode(prompt, answer))


def control_prompts(model: Any, sample: Mapping[str, Any], n: int, answer: str | None = None) -> list[Prompt]:
    """Up to `n` unrelated facts (another relation, subject and answer than `sample`'s), encoded.

    The facts come from `knowmri.data.relations.controls_for` (built-in facts SmolLM2-135M answers
    top-1); a sample may bring its own as `control_prompts` (a list of {"prompt", "ground_truth"})."""
    from knowmri.data.relations import controls_for

    given = sample.get("control_prompts") or []
    facts = [f for f in given if isinstance(f, Mapping) and f.get("prompt") and f.get("ground_truth")]
    if len(facts) < n:
        probe = dict(sample)
        if answer:
            probe["ground_truth"] = answer
        seen = {f["prompt"] for f in facts}
        facts += [f for f in controls_for(probe, n + len(facts)) if f["prompt"] not in seen]
    out = []
    for fact in facts[:n]:
        try:
            out.append(encode_prompt(model, fact["prompt"], fact["ground_truth"]))
        except ValueError:
            continue
    return out


def neuron_edit(neurons: Sequence[tuple[int, int]], factor: float) -> NeuronEdit:
    """The edit scaling every (layer, unit) by `factor` (0 ablates)."""
    out: NeuronEdit = {}
    for layer, unit in neurons:
        out.setdefault(int(layer), []).append((int(unit), float(factor)))
    return out


def _batch(model: Any, prompts: Sequence[Prompt], order: Sequence[int]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The inputs of rows reading `prompts[order[i]]`, right-padded to one length, and each row's read position."""
    encs = [prompts[i].enc for i in order]
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    device = encs[0].input_ids.device

    def stack(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
        width = max(t.shape[1] for t in tensors)
        out = torch.full((len(tensors), width), value, dtype=tensors[0].dtype, device=device)
        for r, t in enumerate(tensors):
            out[r, : t.shape[1]] = t[0]
        return out

    causal = model.kind == "causal"
    ids = [e.input_ids[:, : e.pred_pos + 1] if causal else e.input_ids for e in encs]
    masks = [e.attention_mask[:, : e.pred_pos + 1] if causal else e.attention_mask for e in encs]
    inputs = {"input_ids": stack(ids, pad), "attention_mask": stack(masks, 0)}
    if encs[0].decoder_input_ids is not None:
        inputs["decoder_input_ids"] = stack([e.decoder_input_ids for e in encs], pad)
    return inputs, [e.target_positions[0] for e in encs]


def _apply(h: Hooks, edits: Sequence[NeuronEdit]) -> None:
    """Register one hook per layer that scales each row's units by that row's factors."""
    by_layer: dict[int, tuple[list[int], list[int], list[float]]] = {}
    for row, edit in enumerate(edits):
        for layer, pairs in edit.items():
            rows, units, factors = by_layer.setdefault(layer, ([], [], []))
            for unit, factor in pairs:
                rows.append(row)
                units.append(unit)
                factors.append(factor)
    for layer, entries in by_layer.items():
        def make(lo: int, hi: int, entries: tuple[list[int], list[int], list[float]] = entries) -> Any:
            picked = [(r, u - lo, f) for r, u, f in zip(*entries) if lo <= u < hi]
            if not picked:  # an expert none of the units belongs to
                return None
            rows, units, factors = (list(c) for c in zip(*picked))

            def fn(x: torch.Tensor) -> torch.Tensor:
                x = x.clone()
                r = torch.tensor(rows, device=x.device)
                u = torch.tensor(units, device=x.device)
                f = torch.tensor(factors, device=x.device, dtype=x.dtype)
                x[r, :, u] = x[r, :, u] * f[:, None]
                return x

            return fn

        neuron_units.edit(h, h.model, layer, make)


@torch.inference_mode()
def answer_probs(model: Any, prompts: Sequence[Prompt], rows: Sequence[Row], batch_tokens: int = 2048,
                 replay: bool = True) -> list[float]:
    """P(first answer token) of each row (a prompt under a neuron edit), rows batched by token count.

    With `replay`, on a causal model, an edit whose first layer is l re-runs blocks l..L-1 only
    (`replayed_probs`); without, every row is a whole forward."""
    if not rows:
        return []
    if replay and model.kind == "causal" and not model.moe_layers:
        fast = replayed_probs(model, prompts, rows, batch_tokens)
        if fast is not None:
            return fast
    out: list[float] = []
    width = max(p.enc.input_ids.shape[1] for p in prompts)
    per = max(1, batch_tokens // max(1, width))
    for start in range(0, len(rows), per):
        chunk = rows[start:start + per]
        inputs, reads = _batch(model, prompts, [i for i, _ in chunk])
        keep = sorted(set(reads))
        with Hooks(model) as h:
            _apply(h, [edit for _, edit in chunk])
            logits = model.run(keep=keep, **inputs).logits
        at = torch.tensor([keep.index(p) for p in reads], device=logits.device)
        picked = logits[torch.arange(len(chunk), device=logits.device), at].float().log_softmax(-1)
        ids = torch.tensor([prompts[i].enc.target_ids[0] for i, _ in chunk], device=logits.device)
        out += picked.gather(-1, ids[:, None])[:, 0].exp().tolist()
    return out


@contextmanager
def _blocks_given(model: Any, output: Any, upto: int, select: torch.Tensor) -> Iterator[None]:
    """Inside, blocks 0..upto-1 compute nothing: block upto-1 returns the rows `select` of `output` (its
    recorded output for every prompt unedited), the ones before it pass their input on."""
    def given(*args: Any, **kwargs: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.index_select(0, select.to(hidden.device))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def passed_on(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    blocks = list(model.layers)[:upto]
    for j, block in enumerate(blocks):
        block.forward = given if j == upto - 1 else passed_on
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def replayed_probs(model: Any, prompts: Sequence[Prompt], rows: Sequence[Row], batch_tokens: int = 2048) -> list[float] | None:
    """`answer_probs` on a causal model without re-running what an edit cannot change: one forward of every
    prompt unedited records each block's output (and gives the unedited rows), then the rows whose edit
    starts at layer l run blocks l..L-1 only, from the recorded output of block l-1 (a screened neuron
    of layer 28 of 30 costs 2 blocks, not 30). None where a block returns more than its hidden states."""
    n = len(prompts)
    inputs, reads = _batch(model, prompts, list(range(n)))
    keep = sorted(set(reads))
    at = torch.tensor([keep.index(p) for p in reads])
    ids = torch.tensor([p.enc.target_ids[0] for p in prompts])

    def probs(logits: torch.Tensor, order: torch.Tensor) -> list[float]:
        picked = logits[torch.arange(len(order), device=logits.device), at[order].to(logits.device)].float()
        return picked.log_softmax(-1).gather(-1, ids[order][:, None].to(logits.device))[:, 0].exp().tolist()

    starts = [min(edit) if edit else None for _, edit in rows]
    layers = sorted({s for s in starts if s})
    outputs: dict[int, Any] = {}
    handles = [model.layers[layer - 1].register_forward_hook(
        lambda module, args, out, layer=layer: outputs.__setitem__(layer, out)) for layer in layers]
    try:
        base = probs(model.run(keep=keep, **inputs).logits, torch.arange(n))
    finally:
        for handle in handles:
            handle.remove()
    if any(isinstance(out, tuple) and any(isinstance(x, torch.Tensor) for x in out[1:]) for out in outputs.values()):
        return None
    out = [base[i] if start is None else 0.0 for (i, _), start in zip(rows, starts)]
    per = max(1, batch_tokens // max(1, inputs["input_ids"].shape[1]))
    for start in sorted({s for s in starts if s is not None}):
        index = [r for r, s in enumerate(starts) if s == start]
        for first in range(0, len(index), per):
            chunk = index[first:first + per]
            order = torch.tensor([rows[r][0] for r in chunk])
            batch = {k: v.index_select(0, order.to(v.device)) for k, v in inputs.items()}
            given = _blocks_given(model, outputs[start], start, order) if start else nullcontext()
            with Hooks(model) as h, given:
                _apply(h, [rows[r][1] for r in chunk])
                got = probs(model.run(keep=keep, **batch).logits, order)
            for r, p in zip(chunk, got):
                out[r] = p
    return out


def relative(p: float, base: float) -> float:
    """(p - base) / base: the relative change of a probability (0 when base is 0)."""
    return (p - base) / base if base > 0 else 0.0


def screen(model: Any, fact: Prompt, controls: Sequence[Prompt], neurons: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """Each neuron ablated alone on the fact and on the control facts (one batch row per neuron and prompt).

    Returns per neuron `effect` (the fact's relative change of P(answer)), `control_effect` (the mean
    over the controls) and `generic`: the controls drop by at least GENERIC_RATIO of the fact's drop,
    and by GENERIC_FLOOR or more. Without controls nothing is flagged."""
    prompts = [fact, *controls]
    n = len(prompts)
    rows: list[Row] = [(i, {}) for i in range(n)]
    for layer, unit in neurons:
        rows += [(i, neuron_edit([(layer, unit)], 0.0)) for i in range(n)]
    probs = answer_probs(model, prompts, rows)
    base = probs[:n]
    out = []
    for k, (layer, unit) in enumerate(neurons):
        row = probs[n * (k + 1): n * (k + 2)]
        effects = [relative(p, b) for p, b in zip(row, base)]
        own = effects[0]
        others = effects[1:]
        control = sum(others) / len(others) if others else 0.0
        generic = bool(others) and -control >= max(GENERIC_RATIO * -own, GENERIC_FLOOR)
        out.append({"layer": int(layer), "unit": int(unit), "effect": own, "control_effect": control, "generic": generic})
    return out


def random_units(model: Any, neurons: Sequence[tuple[int, int]], gen: torch.Generator) -> list[tuple[int, int]]:
    """As many random units as `neurons`, each in the same layer as one of them (in a mixture-of-experts layer,
    in the same expert, so that it runs on the same tokens), none of them located."""
    taken = {(int(layer), int(unit)) for layer, unit in neurons}
    out: list[tuple[int, int]] = []
    for layer, located in neurons:
        expert, _ = neuron_units.split(model, layer, located)
        low, span = (0, neuron_units.layer_width(model, layer)) if expert is None else (expert * model.d_expert,
                                                                                       model.d_expert)
        while True:
            unit = low + int(torch.randint(span, (1,), generator=gen))
            if (int(layer), unit) not in taken:
                taken.add((int(layer), unit))
                out.append((int(layer), unit))
                break
    return out


def specificity(model: Any, fact: Prompt, controls: Sequence[Prompt], neurons: Sequence[tuple[int, int]],
                draws: int = 5, seed: int = 0) -> dict[str, Any]:
    """`specificities` of one located set."""
    return specificities(model, fact, controls, {"set": list(neurons)}, draws, seed)["set"]


def specificities(model: Any, fact: Prompt, controls: Sequence[Prompt], sets: Mapping[str, Sequence[tuple[int, int]]],
                  draws: int = 5, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each located set ablated and amplified (x2) on the fact and on unrelated facts, against `draws`
    random sets of units of the same layers and count (on the fact), all in a few batched forwards.

    Per set: `own` / `control` / `random` are relative changes of P(answer) when ablated (`random` the
    mean of the draws, `random_std` their spread; each set's draws from its own generator seeded with
    `seed`), `own_amplified` / `control_amplified` when doubled; `specificity` is the fact's drop less the
    larger of the controls' drops (unrelated facts, random units); `holds` says the fact's drop beats both
    clearly: at least 10%, over twice the unrelated facts' and the random units' (and over the random
    mean plus two spreads). Without control facts `holds` is False (specificity unchecked)."""
    prompts = [fact, *controls]
    n = len(prompts)
    rows: list[Row] = [(i, {}) for i in range(n)]
    starts = {}
    for name, neurons in sets.items():
        gen = torch.Generator().manual_seed(seed)
        starts[name] = len(rows)
        rows += [(i, neuron_edit(neurons, 0.0)) for i in range(n)]
        rows += [(i, neuron_edit(neurons, 2.0)) for i in range(n)]
        rows += [(0, neuron_edit(random_units(model, neurons, gen), 0.0)) for _ in range(draws)]
    probs = answer_probs(model, prompts, rows)
    base = probs[:n]
    return {name: _judged(base, probs[i:i + n], probs[i + n:i + 2 * n], probs[i + 2 * n:i + 2 * n + draws])
            for name, i in starts.items()}


def spread(values: Sequence[float]) -> float:
    """The sample standard deviation (0 for fewer than two values)."""
    return float(torch.tensor(list(values), dtype=torch.float64).std()) if len(values) > 1 else 0.0


def beats(drop: float, controls: Sequence[tuple[float, float]]) -> bool:
    """Whether a relative drop clearly beats each control (mean drop, spread): at least 10%, over twice the
    control's mean and over its mean plus two spreads."""
    return drop >= 0.1 and all(drop > 2 * max(mean, 0.0) and drop > mean + 2 * std for mean, std in controls)


def _judged(base: list[float], ablated: list[float], amplified: list[float], rand: list[float]) -> dict[str, Any]:
    own = relative(ablated[0], base[0])
    controls_ablated = [relative(p, b) for p, b in zip(ablated[1:], base[1:])]
    controls_amplified = [relative(p, b) for p, b in zip(amplified[1:], base[1:])]
    random_effects = [relative(p, base[0]) for p in rand]
    control = sum(controls_ablated) / len(controls_ablated) if controls_ablated else 0.0
    random_mean = sum(random_effects) / len(random_effects) if random_effects else 0.0
    random_std = spread(random_effects)
    drop, control_drop, random_drop = -own, -control, -random_mean
    holds = bool(controls_ablated) and beats(drop, [(control_drop, 0.0), (random_drop, random_std)])
    return {
        "base_prob": base[0], "ablated": ablated[0], "amplified": amplified[0],
        "own": own, "own_amplified": relative(amplified[0], base[0]),
        "control": control, "control_spread": spread(controls_ablated),
        "control_amplified": sum(controls_amplified) / len(controls_amplified) if controls_amplified else 0.0,
        "n_controls": len(controls_ablated),
        "controls_base_prob": sum(base[1:]) / len(base[1:]) if controls_ablated else None,
        "random": random_mean, "random_std": random_std, "random_draws": len(rand),
        "random_ablated": sum(rand) / len(rand) if rand else base[0],
        "specificity": drop - max(control_drop, random_drop), "holds": holds,
    }


def control_warnings(base_prob: float, n_controls: int, wanted: int) -> list[str]:
    """The caveats of a check: a fact the model hardly gives, and too few unrelated facts to compare with."""
    out = []
    if base_prob < KNOWN_FLOOR:
        out.append(f"the model gives the answer only P={base_prob:.3g}: it does not know this fact, so what is located "
                   "for it is not knowledge of it")
    if n_controls == 0:
        out.append("no unrelated control facts: the effect on other facts (specificity) is not checked")
    elif n_controls < MIN_CONTROLS:
        out.append(f"only {n_controls} unrelated control fact(s) (of {wanted} asked for; {MIN_CONTROLS} or more are "
                   "needed): the effect on other facts is a rough estimate")
    return out


#: The share of the blocks a screened neuron's rows re-run, for estimates (`replayed_probs` starts them at
#: the neuron's layer): on SmolLM2 the candidates lie in the upper half (knowledge neurons mostly in layers
#: 20-29 of 30, FiNE's in 28-29).
SCREEN_BLOCKS = 0.5


def screen_passes(model: Any, neurons: int, controls: int, tokens: int) -> list[Any]:
    """The passes of `screen` for `neurons` candidates and `controls` control facts of about `tokens` tokens,
    for `estimate()`: the unedited prompts once, then a row per (neuron, prompt), on a causal model from
    the neuron's layer on (`SCREEN_BLOCKS` of the blocks on average)."""
    from knowmri.methods.costs import Pass

    prompts = controls + 1
    rows = neurons * prompts
    blocks = max(1.0, SCREEN_BLOCKS * model.n_layers) if model.kind == "causal" and not model.moe_layers else None
    return [Pass(rows=prompts, tokens=tokens, readout=prompts), Pass(rows=rows, tokens=tokens, blocks=blocks, readout=rows)]


def screen_cached(model: Any, fact: Prompt, controls: Sequence[Prompt], neurons: Sequence[tuple[int, int]],
                  cache: dict | None = None) -> dict[tuple[int, int], dict[str, Any]]:
    """`screen`, keeping each neuron's entry in `cache` (a run's per-sample cache), so that methods
    screening the same neuron against the same fact and controls (knowledge_neurons, fine) pay once."""
    key = ("knowmri.neuron_screen", id(model), fact.text, fact.answer, tuple((c.text, c.answer) for c in controls))
    known: dict[tuple[int, int], dict[str, Any]] = cache.setdefault(key, {}) if cache is not None else {}
    todo = [(int(layer), int(unit)) for layer, unit in dict.fromkeys(neurons) if (int(layer), int(unit)) not in known]
    if todo:
        for entry in screen(model, fact, controls, todo):
            known[entry["layer"], entry["unit"]] = entry
    return {(int(layer), int(unit)): known[int(layer), int(unit)] for layer, unit in neurons}


def answered(model: Any, prompts: Sequence[Prompt], floor: float) -> list[tuple[Prompt, float]]:
    """The prompts whose P(first answer token) is at least `floor`, with it (one batched pass)."""
    probs = answer_probs(model, prompts, [(i, {}) for i in range(len(prompts))])
    return [(p, q) for p, q in zip(prompts, probs) if q >= floor]
