"""FiNE (Pan et al. 2023, 'Finding and Editing Multi-Modal Neurons in Pre-Trained Transformers'):
each MLP neuron's contribution to the answer is its activation times its value vector's
projection onto the answer token's unembedding, read in one forward pass, no gradients.

As in the paper (and Know-MRI's implementation) the score reads the raw unembedding: the final
norm is left out (`use_final_norm` scales value vectors by its gain instead). Unlike Know-MRI,
which scores the model's greedy tokens, each ground-truth token is scored at its own predicting
position (teacher forced) and the contributions are summed. A layer's contributions add up to its
MLP's direct effect on the answer logit (before the final norm); the score sees direct effects
only, not neurons whose output reaches the answer through later layers (e.g. attention).

The top candidates are screened against unrelated facts (`neuron_controls.screen`): a neuron whose
ablation lowers their P(answer) about as much as the fact's is generic, flagged and left out of the
listed neurons unless `keep_generic`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri import neuron_units
from knowmri.methods import neuron_controls as nc
from knowmri.methods import neuron_readouts as nr
from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import clean_pass, prepare
from knowmri.sample import Sample


@dataclass
class FineParams(Params):
    top_k: int = field(default=20, metadata={"help": "neurons listed, best first"})
    use_final_norm: bool = field(default=False, metadata={
        "help": "scale value vectors by the final norm's gain before the unembedding (the paper's score does not)"})
    top_tokens: int = field(default=5, metadata={"help": "vocabulary tokens shown per neuron (its value vector's projection)"})
    max_answer_tokens: int = field(default=8, metadata={"help": "answer tokens scored (each at its own position)"})
    controls: int = field(default=8, metadata={"help": "unrelated facts the top neurons are screened against "
                                                       "(0 = no generic-neuron screen)"})
    screen: int = field(default=8, metadata={"help": "top neurons screened, best first"})
    keep_generic: bool = field(default=False, metadata={"help": "keep generic neurons (ablating them hurts unrelated "
                                                                "facts as much) among the listed neurons, flagged"})

    def validate(self) -> None:
        if not 1 <= self.top_k <= 1000:
            raise ValueError("top_k must be between 1 and 1000")
        if not 1 <= self.top_tokens <= 50:
            raise ValueError("top_tokens must be between 1 and 50")
        if not 1 <= self.max_answer_tokens <= 64:
            raise ValueError("max_answer_tokens must be between 1 and 64")
        if not 0 <= self.controls <= 50:
            raise ValueError("controls must be between 0 and 50")
        if not 0 <= self.screen <= 100:
            raise ValueError("screen must be between 0 and 100")


@register_method
class Fine(Method):
    name = "fine"
    title = "FiNE neuron contributions"
    path = ("Internal", "Neuron", "MLP")
    paper = "Pan et al. 2023, 'Finding and Editing Multi-Modal Neurons in Pre-Trained Transformers' (FiNE)"
    description = ("Scores every MLP neuron by activation x (value vector . answer unembedding) at the positions that "
                   "predict the answer: its direct contribution to the answer's logit, from one forward pass.")
    requires_keys = ("prompt",)
    requires_capabilities = ()
    Params = FineParams
    reads_clean_pass = True

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """The clean pass, each layer's value vectors dotted with the answer tokens' unembeddings, the
        top neurons' value vectors read through the unembedding, and the screen
        (`neuron_controls.screen_passes`)."""
        from knowmri.methods.costs import (
            Dims,
            clean_pass_bytes,
            clean_pass_passes,
            matmul_seconds,
            prepare_passes,
            readout_pass,
            sample_shape,
            work_estimate,
        )

        p = params if isinstance(params, FineParams) else FineParams()
        shape = sample_shape(model, sample, max_answer_tokens=p.max_answer_tokens)
        dims = Dims.of(model)
        width = neuron_units.width(model)  # a mixture-of-experts layer: every expert's neurons
        per_layer = matmul_seconds(model, 2 * width * dims.d * shape.answer, width)
        passes = [*prepare_passes(model, shape), *clean_pass_passes(model, shape, shape.answer + 1), readout_pass(p.top_k)]
        if p.controls and p.screen:  # the generic-neuron screen: one row per (candidate or none) x prompt
            passes += nc.screen_passes(model, p.screen, p.controls, shape.prompt)
        buffers = clean_pass_bytes(model, shape, shape.answer + 1) + 4 * 3 * shape.answer * dims.layers * width
        if dims.bytes < 4:  # `neuron_top_tokens`: low-precision scores, their slack and the shortlist, and the
            buffers += 3 * 4 * p.top_k * dims.vocab + 4 * dims.vocab * dims.d  # row norms' float32 copy (first use)
        return work_estimate(model, passes, seconds=dims.layers * per_layer, memory=buffers)

    @torch.inference_mode()
    def run(self, model: Any, sample: Sample, params: FineParams, ctx: RunContext) -> MethodResult:
        prep = prepare(model, sample, max_answer_tokens=params.max_answer_tokens, ctx=ctx)
        pairs = nr.answer_tokens(model, prep.enc)
        ids = [t for _, t in pairs]
        positions = [pos for pos, _ in pairs]
        clean_run = clean_pass(model, prep.enc, ctx, positions=positions)  # shared with the other light methods
        rows = clean_run.rows(positions)
        clean = clean_run.neurons[:, rows]  # [L, n_tokens, units]; an expert's neurons times its routing weight
        # each answer token's probability at its own predicting position
        probs = clean_run.logits[rows].float().softmax(-1)[torch.arange(len(pairs)), torch.tensor(ids)]
        gain = nr.final_norm_gain(model) if params.use_final_norm else None
        per_token = torch.zeros(len(pairs), model.n_layers, clean.shape[-1])
        for layer in range(model.n_layers):
            weights = nr.value_logits(model, layer, ids, gain)  # [units, n_tokens]
            width = weights.shape[0]
            per_token[:, layer, :width] = (clean[layer, :, :width].to(weights.device).float() * weights.T).cpu()
            ctx.progress((layer + 1) / model.n_layers, f"layer {layer}")
        scores = per_token.sum(0)
        ranked = nr.ranked(scores, params.top_k + params.screen)
        controls = nc.control_prompts(model, sample, params.controls, prep.answer) if params.controls else []
        fact = nc.encode_prompt(model, prep.prompt, prep.answer)
        keys = [(lay, u) for lay, u, _ in ranked[: params.screen]]
        screened = nc.screen_cached(model, fact, controls, keys, ctx.cache) if controls and keys else {}
        generic = {key for key, e in screened.items() if e["generic"]}
        top = [t for t in ranked if params.keep_generic or (t[0], t[1]) not in generic][: params.top_k]
        apart = [t for t in ranked if (t[0], t[1]) in generic]
        words = nr.neuron_top_tokens(model, [(lay, u) for lay, u, _ in top + apart], params.top_tokens, gain)

        def entry(layer: int, unit: int, score: float, w: list[str]) -> dict[str, Any]:
            return {"layer": layer, **neuron_units.fields(model, layer, unit), "score": score,
                    "activation": float(clean[layer][:, unit].float().sum()),
                    "top_tokens": w, **nr.screen_fields(screened.get((layer, unit)))}

        neurons = [entry(lay, u, s, w) for (lay, u, s), w in zip(top, words)]
        generic_neurons = [entry(lay, u, s, w) for (lay, u, s), w in zip(apart, words[len(top):])]
        base_prob = float(probs[0])
        warnings = nc.control_warnings(base_prob, len(controls), params.controls) if params.controls else \
            nc.control_warnings(base_prob, 0, 0)[:1]
        tok = model.tokenizer
        layer_totals = scores.sum(1)
        result = self.new_result(params)
        result.findings = {
            "target": prep.answer, "answer_source": prep.answer_source, "neurons": neurons,
            "layer_scores": [{"layer": i, "score": float(layer_totals[i])} for i in range(model.n_layers)],
            "tokens": [{"token": tok.decode([t]), "position": pos, "probability": float(p),
                        "best": [{"layer": lay, **neuron_units.fields(model, lay, u), "score": s}
                                 for lay, u, s in nr.ranked(per_token[i], 3)]}
                       for i, ((pos, t), p) in enumerate(zip(pairs, probs))],
            "use_final_norm": params.use_final_norm, "generic_neurons": generic_neurons,
            "controls": [c.text for c in controls], "warnings": warnings,
        }
        result.arrays["contributions"] = scores.numpy()
        result.summary = self._summary(prep, neurons, layer_totals, params, generic_neurons, warnings)
        result.add_figure("Contribution by layer and neuron", nr.grid_figure(
            scores, title=f"FiNE: neuron contributions to the logit of {prep.answer!r}", colorbar="logit contribution"))
        result.add_figure("Top neurons", nr.top_bar_figure(
            neurons, title="Top FiNE neurons (label: the token each one writes most)", x_title="contribution to the answer logit"))
        result.add_table("Top neurons", ["rank", "neuron", "contribution", "activation", "top tokens", *nr.SCREEN_COLUMNS],
                         [[r + 1, nr.neuron_name(n), round(n["score"], 5), round(n["activation"], 5),
                           " | ".join(n["top_tokens"]), *nr.screen_cells(n)] for r, n in enumerate(neurons)])
        if generic_neurons:
            result.add_table(*nr.generic_table(generic_neurons))
        return result

    @staticmethod
    def _summary(prep: Any, neurons: list[dict[str, Any]], layer_totals: torch.Tensor, params: FineParams,
                 generic: list[dict[str, Any]], warnings: list[str]) -> str:
        caveats = "".join(f" Caveat: {w}." for w in warnings)
        left_out = ""
        if generic:
            g = generic[0]
            left_out = (f" {len(generic)} generic neuron(s) ({', '.join(nr.neuron_name(n) for n in generic[:3])}) "
                        f"{'are kept but flagged' if params.keep_generic else 'are left out'}: ablating one lowers unrelated "
                        f"facts' P(answer) about as much as this fact's (e.g. {g['control_effect']:+.0%} vs {g['effect']:+.0%}).")
        best = next((n for n in neurons if not n.get("generic")), neurons[0] if neurons else None)
        if best is None:
            return f"Every top neuron is generic.{left_out}{caveats}"
        if best["score"] <= 0:
            return (f"No MLP neuron pushes the logit of {prep.answer!r} ({prep.answer_source}) up directly; the least "
                    f"negative is {_neuron_words(best)} ({best['score']:.3g}).{left_out}{caveats}")
        top_sum = sum(n["score"] for n in neurons)
        layers = sorted({n["layer"] for n in neurons})
        peak = int(layer_totals.argmax())
        writes = ", ".join(repr(t) for t in best["top_tokens"][:3])
        effect = (f" Ablating it alone changes P(answer) by {best['effect']:+.0%} (unrelated facts: "
                  f"{best['control_effect']:+.0%})." if "effect" in best else "")
        return (f"Scoring each MLP neuron by activation x (value vector . unembedding of the answer), the neuron that most "
                f"directly raises the logit of {prep.answer!r} ({prep.answer_source}) is {_neuron_words(best)} (+{best['score']:.3g}); its value vector mostly promotes {writes}.{effect} The top {len(neurons)} "
                f"neurons sit in layer(s) {', '.join(map(str, layers[:8]))}{'...' if len(layers) > 8 else ''} and add "
                f"{top_sum:+.3g} to the logit together; the MLP layer with the largest total direct contribution is {peak} "
                f"({float(layer_totals[peak]):+.3g}).{left_out}{caveats}")


def _neuron_words(n: dict[str, Any]) -> str:
    """'neuron 17 of layer 3', or 'neuron 17 of expert 5 in layer 3'."""
    expert = f" of expert {n['expert']} in" if "expert" in n else " of"
    return f"neuron {n['unit']}{expert} layer {n['layer']}"
