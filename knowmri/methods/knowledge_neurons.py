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

When the sample has no other phrasings, paraphrases are built from its relation's templates
(`knowmri.data.relations.paraphrases`) and those the model answers (P(answer) above a floor) refine the
set, as the paper refines over several prompts; without any, the set is single-prompt attribution (a
warning says so). The candidates are screened against unrelated facts (`neuron_controls.screen`): a
neuron whose ablation lowers their P(answer) about as much as the fact's is generic (a
massive-activation or sink-like unit), flagged and left out of the located set unless `keep_generic`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri import neuron_units
from knowmri.methods import kn_engine as kn
from knowmri.methods import neuron_controls as nc
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
    paraphrases: int = field(default=2, metadata={"help": "when the sample has one prompt: paraphrases of the fact built "
                                                          "from its relation's templates and added to refine the set "
                                                          "(only those the model answers; 0 = none)"})
    paraphrase_floor: float = field(default=0.1, metadata={"help": "a paraphrase is kept when the model gives the answer "
                                                                   "at least this probability"})
    controls: int = field(default=8, metadata={"help": "unrelated facts the candidate neurons are screened against "
                                                       "(0 = no generic-neuron screen)"})
    screen: int = field(default=8, metadata={"help": "candidate neurons screened, best first"})
    keep_generic: bool = field(default=False, metadata={"help": "keep generic neurons (ablating them hurts unrelated "
                                                                "facts as much) in the located set, flagged"})

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
        if not 0 <= self.paraphrases <= 20:
            raise ValueError("paraphrases must be between 0 and 20")
        if not 0.0 <= self.paraphrase_floor <= 1.0:
            raise ValueError("paraphrase_floor must be in [0, 1]")
        if not 0 <= self.controls <= 50:
            raise ValueError("controls must be between 0 and 50")
        if not 0 <= self.screen <= 100:
            raise ValueError("screen must be between 0 and 100")


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
        key/value copies are the peak); then the listed neurons' value vectors in the vocabulary. Paraphrases
        (when built) count as prompts like the first, after one pass checking them; the screen is
        `neuron_controls.screen_passes` for the candidates, and again for the refined set's top 5 (screened
        where they were not among the candidates)."""
        from knowmri.methods.costs import Dims, Pass, prepare_passes, readout_pass, sample_shape, work_estimate

        p = params if isinstance(params, KnowledgeNeuronsParams) else KnowledgeNeuronsParams()
        dims = Dims.of(model)
        L, causal = dims.layers, model.kind == "causal"
        from knowmri.data.relations import paraphrases

        passes: list[Pass] = []
        prompts = sample.all_prompts()
        built = paraphrases(sample) if p.paraphrases and len(prompts) == 1 else []
        first = sample_shape(model, sample, p.max_answer_tokens)
        if built:  # the paraphrases' check, then (at most) `paraphrases` more prompts like the first
            passes.append(Pass(rows=len(built), tokens=first.prompt + 2, readout=len(built)))
            prompts = prompts + prompts[:1] * min(p.paraphrases, len(built))
        if p.controls and p.screen:  # the generic-neuron screen of the candidates, then of the refined set's
            passes += nc.screen_passes(model, p.screen, p.controls, first.prompt)  # top 5 not screened yet
            passes += nc.screen_passes(model, 5, p.controls, first.prompt)
        for j, prompt in enumerate(prompts):
            shape = first if j == 0 or prompt == prompts[0] else sample_shape(model, sample.replace(prompt=prompt),
                                                                              p.max_answer_tokens)
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
        buffers = 4 * 3 * L * neuron_units.width(model) * max(1, len(prompts))  # attributions, their means
        return work_estimate(model, passes, memory=buffers)

    def run(self, model: Any, sample: Sample, params: KnowledgeNeuronsParams, ctx: RunContext) -> MethodResult:
        first = prepare(model, sample, max_answer_tokens=params.max_answer_tokens)
        fact = nc.encode_prompt(model, first.prompt, first.answer)
        added = self._paraphrases(model, sample, fact, params)
        prompts = [*sample.all_prompts(), *added]
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
            by_position = torch.zeros(len(positions), model.n_layers, attr.shape[-1])
            for (q, _, _), a in zip(jobs, attr):
                by_position[positions.index(q)] += a
            total = by_position.sum(0)  # summed over the answer's tokens (and the scaled positions)
            peak = float(total.max())
            coarse = kn.coarse_neurons(total, params.threshold)
            totals.append((total, coarse))
            details.append({
                "prompt": prompt, "paraphrase": prompt in added, "answer_tokens": [model.tokenizer.decode([t]) for _, t in pairs],
                "positions": [pos for pos, _ in pairs], "probabilities": nr.token_probs(logits, pairs),
                "max_attribution": peak, "n_coarse": int(coarse.sum()),
                "top": [{"layer": lay, **neuron_units.fields(model, lay, u), "score": s, **self._where(model, prep, positions, by_position, lay, u, params)}
                        for lay, u, s in nr.ranked(total, 5)],
            })
        mean = torch.stack([t for t, _ in totals]).mean(0)
        top = nr.ranked(mean, params.top_k)
        controls = nc.control_prompts(model, sample, params.controls, first.answer) if params.controls else []
        screened: dict[tuple[int, int], dict[str, Any]] = {}

        def screen(keys: list[tuple[int, int]]) -> None:
            if controls and keys:
                screened.update(nc.screen_cached(model, fact, controls, keys, ctx.cache))

        screen(nr.top_keys(mean, params.screen))
        for _ in range(2):  # the threshold is relative to the strongest neuron that is not generic; then its top 5 screened
            generic = [key for key, e in screened.items() if e["generic"]]
            refined, counts, kept = self._refine([t for t, _ in totals], mean, [] if params.keep_generic else generic, params)
            fresh = [key for key in refined[:5] if key not in screened]
            if not fresh:
                break
            screen(fresh)
        generic = [key for key, e in screened.items() if e["generic"]]
        located = [key for key in refined if params.keep_generic or key not in generic]
        gain = nr.final_norm_gain(model) if params.use_final_norm else None
        listed = list(dict.fromkeys(located[: params.top_k] + generic + [(lay, u) for lay, u, _ in top]))
        words = dict(zip(listed, nr.neuron_top_tokens(model, listed, 5, gain)))

        def entry(layer: int, unit: int) -> dict[str, Any]:
            out = {"layer": layer, **neuron_units.fields(model, layer, unit), "score": float(mean[layer, unit]), "prompts": int(counts[layer, unit]),
                   "top_tokens": words.get((layer, unit), [])}
            return {**out, **nr.screen_fields(screened.get((layer, unit)))}

        neurons = [entry(lay, u) for lay, u in located]
        for n in neurons[params.top_k:]:
            n.pop("top_tokens")
        base_prob = details[0]["probabilities"][0]
        warnings = nc.control_warnings(base_prob, len(controls), params.controls) if params.controls else \
            nc.control_warnings(base_prob, 0, 0)[:1]
        if len(prompts) == 1:
            warnings.append("the located set is unrefined single-prompt attribution: the sample has no other phrasing "
                            "and no paraphrase of the fact that the model answers could be built")
        if not neurons:
            warnings.append("no knowledge neuron passed the threshold and refinement" +
                            (" once the generic neurons are left out" if generic else ""))
        result = self.new_result(params)
        result.findings = {
            "target": first.answer, "answer_source": first.answer_source, "n_prompts": len(prompts),
            "paraphrases": added, "threshold": params.threshold, "p": params.p, "neurons": neurons,
            "generic_neurons": [entry(lay, u) for lay, u in generic],
            "controls": [c.text for c in controls],
            "top_neurons": [entry(lay, u) for lay, u, _ in top],
            "layer_scores": [{"layer": i, "score": float(mean[i].sum())} for i in range(model.n_layers)],
            "layer_peaks": [{"layer": i, "score": float(mean[i].max())} for i in range(model.n_layers)],
            "layer_counts": [int(kept[i].sum()) for i in range(model.n_layers)],
            "prompts": details, "warnings": warnings,
        }
        if not neurons:
            result.findings["holds"] = False
        result.arrays["attributions"] = mean.numpy()
        result.summary = self._summary(first, prompts, added, params, neurons, result.findings)
        result.add_figure("Attribution by layer and neuron", nr.grid_figure(
            mean, title=f"Knowledge-neuron attribution to P({first.answer!r}) (mean over prompts)", colorbar="attribution"))
        shown = neurons if neurons else [n for n in result.findings["top_neurons"] if not n.get("generic")]
        result.add_figure("Top knowledge neurons", nr.top_bar_figure(
            shown, title="Knowledge neurons (label: the token each one writes most; generic neurons left out)",
            x_title="attribution"))
        result.add_table("Knowledge neurons", ["rank", "neuron", "attribution", "prompts sharing it", "top tokens",
                                               *nr.SCREEN_COLUMNS],
                         [[r + 1, nr.neuron_name(n), round(n["score"], 6), n["prompts"],
                           " | ".join(n.get("top_tokens", [])), *nr.screen_cells(n)] for r, n in enumerate(shown[: params.top_k])])
        if generic:
            result.add_table(*nr.generic_table(result.findings["generic_neurons"]))
        result.add_table("Per prompt", ["prompt", "paraphrase", "P(answer tokens)", "max attribution", "coarse neurons"],
                         [[d["prompt"], "yes" if d["paraphrase"] else "", ", ".join(f"{p:.3f}" for p in d["probabilities"]),
                           round(d["max_attribution"], 6), d["n_coarse"]] for d in details])
        return result

    @staticmethod
    def _refine(totals: list[torch.Tensor], mean: torch.Tensor, generic: list[tuple[int, int]],
                params: KnowledgeNeuronsParams) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
        """Dai et al.'s threshold per prompt and refinement over the prompts, with the `generic` neurons left
        out first (so the threshold is relative to the strongest of the others): the refined set by mean
        attribution, each neuron's prompt count and the refined mask."""
        masked = []
        for total in totals:
            total = total.clone()
            for layer, unit in generic:
                total[layer, unit] = 0.0
            masked.append(kn.coarse_neurons(total, params.threshold))
        kept, counts = kn.refine(masked, params.p)
        idx = kept.nonzero()[mean[kept].argsort(descending=True)]
        return [(int(lay), int(u)) for lay, u in idx], counts, kept

    @staticmethod
    def _paraphrases(model: Any, sample: Sample, fact: nc.Prompt, params: KnowledgeNeuronsParams) -> list[str]:
        """Paraphrases of a one-prompt sample's fact that the model answers (P(answer) >= the floor), best first."""
        from knowmri.data.relations import paraphrases

        if params.paraphrases == 0 or len(sample.all_prompts()) > 1:
            return []
        built = []
        for text in paraphrases(sample):
            try:
                built.append(nc.encode_prompt(model, text, fact.answer))
            except ValueError:
                continue
        if not built:
            return []
        answered = sorted(nc.answered(model, built, params.paraphrase_floor), key=lambda pq: -pq[1])
        return [p.text for p, _ in answered[: params.paraphrases]]

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
    def _summary(prep: Any, prompts: list[str], added: list[str], params: KnowledgeNeuronsParams,
                 neurons: list[dict[str, Any]], findings: dict[str, Any]) -> str:
        n_prompts = len(prompts)
        if n_prompts == 1:
            over = "on the single prompt (unrefined single-prompt attribution)"
        elif added:
            over = (f"over {n_prompts} prompts (the query and {len(added)} paraphrase(s) of the fact that the model "
                    f"answers)")
        else:
            over = f"over {n_prompts} phrasings of the query"
        generic = findings["generic_neurons"]
        caveats = "".join(f" Caveat: {w}." for w in findings["warnings"])
        left_out = ""
        if generic:
            g = generic[0]
            left_out = (f" {len(generic)} generic neuron(s) ({', '.join(nr.neuron_name(n) for n in generic[:3])}) "
                        f"{'are kept but flagged' if params.keep_generic else 'are left out'}: ablating one lowers unrelated "
                        f"facts' P(answer) about as much as this fact's (e.g. {g['control_effect']:+.0%} vs {g['effect']:+.0%}).")
        if not neurons:
            return (f"No neuron's attribution to {prep.answer!r} ({prep.answer_source}) passed {params.threshold:.0%} of the "
                    f"largest in at least {params.p:.0%} of the prompts {over}; see the top neurons table for the "
                    f"strongest.{left_out}{caveats}")
        best = next((n for n in neurons if not n.get("generic")), neurons[0])
        writes = ", ".join(repr(t) for t in best.get("top_tokens", [])[:3])
        layers = sorted({n["layer"] for n in neurons})
        peak = max(findings["layer_scores"], key=lambda d: d["score"])
        expert = f" of expert {best['expert']}" if "expert" in best else ""
        effect = (f" Ablating it alone changes P(answer) by {best['effect']:+.0%} (unrelated facts: "
                  f"{best['control_effect']:+.0%})." if "effect" in best else "")
        return (f"Integrated gradients {over} locate {len(neurons)} knowledge neuron(s) for {prep.answer!r} "
                f"({prep.answer_source}) in layer(s) {', '.join(map(str, layers[:8]))}{'...' if len(layers) > 8 else ''}. "
                f"The strongest is neuron {best['unit']}{expert} of layer {best['layer']} (attribution {best['score']:.4g}, found in "
                f"{best['prompts']} of {n_prompts} prompt(s)); its value vector mostly promotes {writes}.{effect} "
                f"Layer {peak['layer']} carries the most attribution in total ({peak['score']:.4g}).{left_out}{caveats}")
