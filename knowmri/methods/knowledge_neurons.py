"""Knowledge neurons (Dai et al. 2022): integrated gradients of P(answer) with respect to every
MLP neuron at the answer-predicting position, kept above an adaptive threshold per prompt and
refined to the neurons that most paraphrases of the query share.

Choices, per the paper and the authors' code (Hunter-DDM/knowledge-neurons): threshold 0.2 x the
prompt's largest attribution; a neuron is kept when at least p = 0.7 of the prompts (`prompt` and
`prompts`) share it (EleutherAI's package uses p = 0.5 and a strict '>'). A multi-token answer is
teacher forced; each token is attributed at its own predicting position and the per-token
attributions are summed (EleutherAI averages them: same ranking and same relative threshold).
`positions` extends the paper to neurons at the subject's tokens or at every position, where a
fact recalled from the subject is stored (the paper's position only sees what is read out there).
The IG rows are batched, and the rows scaling layer l start at block l from the clean residual
stream (see `kn_engine.ig_neurons`); the result equals the per-layer loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.methods import kn_engine as kn
from knowmri.methods import neuron_readouts as nr
from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import prepare
from knowmri.sample import Sample


@dataclass
class KnowledgeNeuronsParams(Params):
    steps: int = field(default=20, metadata={"help": "integrated-gradient steps (scaled copies of each layer's activation)"})
    threshold: float = field(default=0.2, metadata={"help": "adaptive threshold: keep neurons above this fraction of the "
                                                            "prompt's largest attribution (Dai et al.: 0.2)"})
    p: float = field(default=0.7, metadata={"help": "refinement: keep neurons found in at least this fraction of the prompts "
                                                    "(the authors' code: 0.7)"})
    top_k: int = field(default=20, metadata={"help": "neurons listed (with the tokens they write) besides the refined set"})
    max_answer_tokens: int = field(default=4, metadata={"help": "answer tokens attributed (each at its own position)"})
    riemann: str = field(default="right", metadata={"help": "IG scaling points: 'right' = k/steps, k=1..steps (the paper); "
                                                            "'linspace' = linspace(0, 1, steps) (EleutherAI's package)",
                                                    "choices": ["right", "linspace"]})
    positions: str = field(default="answer", metadata={
        "help": "where neurons are attributed: 'answer' = the position predicting each answer token (the paper); "
                "'subject' = the subject's tokens; 'all' = every input position (slower)",
        "choices": ["answer", "subject", "all"]})
    batch_size: int = field(default=0, metadata={"help": "rows (layer x step copies) per forward/backward; 0 = automatic"})
    use_final_norm: bool = field(default=True, metadata={"help": "scale value vectors by the final norm's gain before "
                                                                 "projecting them onto the vocabulary (top tokens)"})

    def validate(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise ValueError("steps must be between 1 and 1000")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError("threshold must be in [0, 1)")
        if not 0.0 < self.p <= 1.0:
            raise ValueError("p must be in (0, 1]")
        if not 1 <= self.top_k <= 1000:
            raise ValueError("top_k must be between 1 and 1000")
        if not 1 <= self.max_answer_tokens <= 64:
            raise ValueError("max_answer_tokens must be between 1 and 64")
        if self.riemann not in ("right", "linspace"):
            raise ValueError("riemann must be 'right' or 'linspace'")
        if self.positions not in ("answer", "subject", "all"):
            raise ValueError("positions must be 'answer', 'subject' or 'all'")
        if self.batch_size < 0:
            raise ValueError("batch_size must be 0 (automatic) or positive")


@register_method
class KnowledgeNeurons(Method):
    name = "knowledge_neurons"
    title = "Knowledge neurons"
    path = ("Internal", "Neuron", "MLP")
    paper = "Dai et al. 2022, 'Knowledge Neurons in Pretrained Transformers'"
    description = ("Integrated gradients of the answer's probability over every MLP neuron; the neurons above 20% of "
                   "the top attribution that most phrasings of the query share are the fact's knowledge neurons.")
    requires_keys = ("prompt",)
    requires_capabilities = ("gradients",)
    Params = KnowledgeNeuronsParams

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """Per prompt: a clean forward (full logits); per job (scaled position q, predicting position p),
        the set-up forwards of `kn_engine._Direct` (the clean prefix's cache, two recorded forwards, a
        check) and its IG rows: `steps` rows per layer, rows of layer l over blocks l..L-1, batched as
        `kn_engine.row_chunks` batches them (forward and backward; the largest batch's activations and
        key/value copies are the peak); then the listed neurons' value vectors in the vocabulary."""
        from knowmri.methods.costs import Dims, Pass, prepare_passes, readout_pass, sample_shape, work_estimate

        p = params if isinstance(params, KnowledgeNeuronsParams) else KnowledgeNeuronsParams()
        dims = Dims.of(model)
        L, causal = dims.layers, model.kind == "causal"
        passes: list[Pass] = []
        for j, prompt in enumerate(sample.all_prompts()):
            shape = sample_shape(model, sample if j == 0 else sample.replace(prompt=prompt), p.max_answer_tokens)
            if j == 0:
                passes += prepare_passes(model, shape)
            passes.append(Pass(tokens=shape.input + shape.decoder, readout=shape.positions))
            answer = [shape.prompt - 1 + i for i in range(shape.answer)] if causal else list(range(shape.answer))
            if p.positions == "answer":
                candidates = None
            elif p.positions == "subject":
                candidates = list(range(*shape.subject)) if shape.subject is not None else []
            else:
                candidates = list(range(shape.positions))
            jobs = [(q, q) for q in answer] if candidates is None else \
                [(q, a) for a in answer for q in candidates if not causal or q <= a]
            for scaled, predict in jobs:
                fed, prefix = (predict - scaled + 1, scaled) if causal else (shape.positions, 0)
                if causal and scaled == 0:
                    fed = predict + 1
                passes += [Pass(tokens=prefix, readout=prefix, cache=True, count=1 if prefix else 0),
                           *(Pass(rows=b, tokens=fed, context=prefix + fed, readout=b * fed, cache=bool(prefix))
                             for b in (1, 2)),
                           Pass(tokens=fed, context=prefix + fed, readout=1, model_call=False)]
                for chunk in kn.row_chunks(model, p.steps, fed, prefix, p.batch_size, range(L)):
                    rows = p.steps * len(chunk)
                    block_rows = sum(p.steps * (L - layer) for layer in chunk)
                    passes.append(Pass(rows=rows, tokens=fed, blocks=block_rows / rows, span=L - chunk[0],
                                       context=prefix + fed, readout=rows, backward=True, cache=bool(prefix),
                                       model_call=False))
        passes.append(readout_pass(2 * p.top_k))
        buffers = 4 * 3 * L * dims.d_mlp * max(1, len(sample.all_prompts()))  # attributions, their means
        return work_estimate(model, passes, memory=buffers)

    def run(self, model: Any, sample: Sample, params: KnowledgeNeuronsParams, ctx: RunContext) -> MethodResult:
        prompts = sample.all_prompts()
        first = prepare(model, sample, max_answer_tokens=params.max_answer_tokens)
        others = sample if first.answer_source == "ground_truth" else sample.replace(ground_truth=first.answer)
        totals, details = [], []
        for j, prompt in enumerate(prompts):
            prep = first if j == 0 else prepare(model, others, prompt=prompt, max_answer_tokens=params.max_answer_tokens)
            pairs = nr.answer_tokens(model, prep.enc)
            jobs, positions = kn.ig_jobs(model, prep.enc, pairs, params.positions, prep.subject)
            clean, logits = nr.clean_neurons(model, prep.enc, positions)

            def tick(frac: float, j: int = j) -> None:
                ctx.progress((j + frac) / len(prompts), f"prompt {j + 1}/{len(prompts)}")

            attr = kn.ig_neurons(model, prep.enc, jobs, clean, positions, steps=params.steps, riemann=params.riemann,
                                 batch_size=params.batch_size, progress=tick)
            by_position = torch.zeros(len(positions), model.n_layers, model.d_mlp)
            for (q, _, _), a in zip(jobs, attr):
                by_position[positions.index(q)] += a
            total = by_position.sum(0)  # summed over the answer's tokens (and the scaled positions)
            peak = float(total.max())
            coarse = kn.coarse_neurons(total, params.threshold)
            totals.append((total, coarse))
            details.append({
                "prompt": prompt, "answer_tokens": [model.tokenizer.decode([t]) for _, t in pairs],
                "positions": [pos for pos, _ in pairs], "probabilities": nr.token_probs(logits, pairs),
                "max_attribution": peak, "n_coarse": int(coarse.sum()),
                "top": [{"layer": lay, "unit": u, "score": s, **self._where(model, prep, positions, by_position, lay, u, params)}
                        for lay, u, s in nr.ranked(total, 5)],
            })
        mean = torch.stack([t for t, _ in totals]).mean(0)
        kept, counts = kn.refine([c for _, c in totals], params.p)
        order = mean[kept].argsort(descending=True)
        idx = kept.nonzero()[order]
        refined = [(int(lay), int(u)) for lay, u in idx]
        top = nr.ranked(mean, params.top_k)
        gain = nr.final_norm_gain(model) if params.use_final_norm else None
        listed = list(dict.fromkeys(refined[: params.top_k] + [(lay, u) for lay, u, _ in top]))
        words = dict(zip(listed, nr.neuron_top_tokens(model, listed, 5, gain)))

        def entry(layer: int, unit: int) -> dict[str, Any]:
            return {"layer": layer, "unit": unit, "score": float(mean[layer, unit]), "prompts": int(counts[layer, unit]),
                    "top_tokens": words.get((layer, unit), [])}

        neurons = [entry(lay, u) for lay, u in refined]
        for n in neurons[params.top_k:]:
            n.pop("top_tokens")
        result = self.new_result(params)
        result.findings = {
            "target": first.answer, "answer_source": first.answer_source, "n_prompts": len(prompts),
            "threshold": params.threshold, "p": params.p, "neurons": neurons,
            "top_neurons": [entry(lay, u) for lay, u, _ in top],
            "layer_scores": [{"layer": i, "score": float(mean[i].sum())} for i in range(model.n_layers)],
            "layer_peaks": [{"layer": i, "score": float(mean[i].max())} for i in range(model.n_layers)],
            "layer_counts": [int(kept[i].sum()) for i in range(model.n_layers)],
            "prompts": details,
        }
        result.arrays["attributions"] = mean.numpy()
        result.summary = self._summary(first, len(prompts), params, neurons, result.findings["layer_scores"])
        result.add_figure("Attribution by layer and neuron", nr.grid_figure(
            mean, title=f"Knowledge-neuron attribution to P({first.answer!r}) (mean over prompts)", colorbar="attribution"))
        shown = neurons if neurons else result.findings["top_neurons"]
        result.add_figure("Top knowledge neurons", nr.top_bar_figure(
            shown, title="Knowledge neurons (label: the token each one writes most)", x_title="attribution"))
        result.add_table("Knowledge neurons", ["rank", "neuron", "attribution", "prompts sharing it", "top tokens"],
                         [[r + 1, f"L{n['layer']}.U{n['unit']}", round(n["score"], 6), n["prompts"],
                           " | ".join(n.get("top_tokens", []))] for r, n in enumerate(shown[: params.top_k])])
        result.add_table("Per prompt", ["prompt", "P(answer tokens)", "max attribution", "coarse neurons"],
                         [[d["prompt"], ", ".join(f"{p:.3f}" for p in d["probabilities"]), round(d["max_attribution"], 6),
                           d["n_coarse"]] for d in details])
        return result

    @staticmethod
    def _where(model: Any, prep: Any, positions: list[int], by_position: torch.Tensor, layer: int, unit: int,
               params: KnowledgeNeuronsParams) -> dict[str, Any]:
        """Where a neuron's attribution sits, when neurons are attributed at more than the answer positions."""
        if params.positions == "answer":
            return {}
        q = positions[int(by_position[:, layer, unit].argmax())]
        ids = prep.enc.read_ids
        return {"position": q, "token": model.tokenizer.decode([int(ids[0, q])])}

    @staticmethod
    def _summary(prep: Any, n_prompts: int, params: KnowledgeNeuronsParams, neurons: list[dict[str, Any]],
                 layer_scores: list[dict[str, Any]]) -> str:
        over = f"over {n_prompts} phrasings of the query" if n_prompts > 1 else "on the single prompt (no paraphrases to refine with)"
        if not neurons:
            return (f"No neuron's attribution to {prep.answer!r} ({prep.answer_source}) passed {params.threshold:.0%} of the "
                    f"largest in at least {params.p:.0%} of the prompts {over}; see the top neurons table for the strongest.")
        best = neurons[0]
        writes = ", ".join(repr(t) for t in best.get("top_tokens", [])[:3])
        layers = sorted({n["layer"] for n in neurons})
        peak = max(layer_scores, key=lambda d: d["score"])
        return (f"Integrated gradients {over} locate {len(neurons)} knowledge neuron(s) for {prep.answer!r} "
                f"({prep.answer_source}) in layer(s) {', '.join(map(str, layers[:8]))}{'...' if len(layers) > 8 else ''}. "
                f"The strongest is neuron {best['unit']} of layer {best['layer']} (attribution {best['score']:.4g}, found in "
                f"{best['prompts']} of {n_prompts} prompt(s)); its value vector mostly promotes {writes}. "
                f"Layer {peak['layer']} carries the most attribution in total ({peak['score']:.4g}).")
