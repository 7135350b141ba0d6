"""FiNE (Pan et al. 2023, 'Finding and Editing Multi-Modal Neurons in Pre-Trained Transformers'):
each MLP neuron's contribution to the answer is its activation times its value vector's
projection onto the answer token's unembedding, read in one forward pass, no gradients.

As in the paper (and Know-MRI's implementation) the score reads the raw unembedding: the final
norm is left out (`use_final_norm` scales value vectors by its gain instead). Unlike Know-MRI,
which scores the model's greedy tokens, each ground-truth token is scored at its own predicting
position (teacher forced) and the contributions are summed. A layer's contributions add up to its
MLP's direct effect on the answer logit (before the final norm); the score sees direct effects
only, not neurons whose output reaches the answer through later layers (e.g. attention)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

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

    def validate(self) -> None:
        if not 1 <= self.top_k <= 1000:
            raise ValueError("top_k must be between 1 and 1000")
        if not 1 <= self.top_tokens <= 50:
            raise ValueError("top_tokens must be between 1 and 50")
        if not 1 <= self.max_answer_tokens <= 64:
            raise ValueError("max_answer_tokens must be between 1 and 64")


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

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """The clean pass, each layer's value vectors dotted with the answer tokens' unembeddings, and the
        top neurons' value vectors read through the unembedding."""
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
        per_layer = matmul_seconds(model, 2 * dims.d_mlp * dims.d * shape.answer, dims.d_mlp)
        passes = [*prepare_passes(model, shape), *clean_pass_passes(model, shape, shape.answer + 1), readout_pass(p.top_k)]
        buffers = clean_pass_bytes(model, shape, shape.answer + 1) + 4 * 3 * shape.answer * dims.layers * dims.d_mlp
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
        clean = clean_run.neurons[:, rows]  # [L, n_tokens, d_mlp]
        # each answer token's probability at its own predicting position
        probs = clean_run.logits[rows].float().softmax(-1)[torch.arange(len(pairs)), torch.tensor(ids)]
        gain = nr.final_norm_gain(model) if params.use_final_norm else None
        per_token = torch.zeros(len(pairs), model.n_layers, model.d_mlp)
        for layer in range(model.n_layers):
            weights = nr.value_logits(model, layer, ids, gain)  # [d_mlp, n_tokens]
            per_token[:, layer] = (clean[layer].to(weights.device).float() * weights.T).cpu()
            ctx.progress((layer + 1) / model.n_layers, f"layer {layer}")
        scores = per_token.sum(0)
        top = nr.ranked(scores, params.top_k)
        words = nr.neuron_top_tokens(model, [(lay, u) for lay, u, _ in top], params.top_tokens, gain)
        neurons = [{"layer": lay, "unit": u, "score": s, "activation": float(clean[lay][:, u].float().sum()),
                    "top_tokens": w} for (lay, u, s), w in zip(top, words)]
        tok = model.tokenizer
        layer_totals = scores.sum(1)
        result = self.new_result(params)
        result.findings = {
            "target": prep.answer, "answer_source": prep.answer_source, "neurons": neurons,
            "layer_scores": [{"layer": i, "score": float(layer_totals[i])} for i in range(model.n_layers)],
            "tokens": [{"token": tok.decode([t]), "position": pos, "probability": float(p),
                        "best": [{"layer": lay, "unit": u, "score": s} for lay, u, s in nr.ranked(per_token[i], 3)]}
                       for i, ((pos, t), p) in enumerate(zip(pairs, probs))],
            "use_final_norm": params.use_final_norm,
        }
        result.arrays["contributions"] = scores.numpy()
        result.summary = self._summary(prep, neurons, layer_totals, params)
        result.add_figure("Contribution by layer and neuron", nr.grid_figure(
            scores, title=f"FiNE: neuron contributions to the logit of {prep.answer!r}", colorbar="logit contribution"))
        result.add_figure("Top neurons", nr.top_bar_figure(
            neurons, title="Top FiNE neurons (label: the token each one writes most)", x_title="contribution to the answer logit"))
        result.add_table("Top neurons", ["rank", "neuron", "contribution", "activation", "top tokens"],
                         [[r + 1, f"L{n['layer']}.U{n['unit']}", round(n["score"], 5), round(n["activation"], 5),
                           " | ".join(n["top_tokens"])] for r, n in enumerate(neurons)])
        return result

    @staticmethod
    def _summary(prep: Any, neurons: list[dict[str, Any]], layer_totals: torch.Tensor, params: FineParams) -> str:
        best = neurons[0]
        if best["score"] <= 0:
            return (f"No MLP neuron pushes the logit of {prep.answer!r} ({prep.answer_source}) up directly; the least "
                    f"negative is neuron {best['unit']} of layer {best['layer']} ({best['score']:.3g}).")
        top_sum = sum(n["score"] for n in neurons)
        layers = sorted({n["layer"] for n in neurons})
        peak = int(layer_totals.argmax())
        writes = ", ".join(repr(t) for t in best["top_tokens"][:3])
        return (f"Scoring each MLP neuron by activation x (value vector . unembedding of the answer), the neuron that most "
                f"directly raises the logit of {prep.answer!r} ({prep.answer_source}) is neuron {best['unit']} of layer "
                f"{best['layer']} (+{best['score']:.3g}); its value vector mostly promotes {writes}. The top {len(neurons)} "
                f"neurons sit in layer(s) {', '.join(map(str, layers[:8]))}{'...' if len(layers) > 8 else ''} and add "
                f"{top_sum:+.3g} to the logit together; the MLP layer with the largest total direct contribution is {peak} "
                f"({float(layer_totals[peak]):+.3g}).")
