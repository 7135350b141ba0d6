"""Logit lens (nostalgebraist 2020): read every layer's residual stream through the final norm
and the unembedding, to see at which layer the answer appears."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.hooks import Hooks, site
from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import forward_cost, prepare
from knowmri.report import figures
from knowmri.sample import Sample


@dataclass
class LogitLensParams(Params):
    top_k: int = field(default=5, metadata={"help": "top tokens listed per layer and position"})
    positions: str = field(default="all", metadata={"help": "'all' positions of the prompt, or 'last'",
                                                    "choices": ["all", "last"]})

    def validate(self) -> None:
        if not 1 <= self.top_k <= 50:
            raise ValueError("top_k must be between 1 and 50")
        if self.positions not in ("all", "last"):
            raise ValueError("positions must be 'all' or 'last'")


@register_method
class LogitLens(Method):
    name = "logit_lens"
    title = "Logit lens"
    path = ("Internal", "Representation", "Hidden states")
    paper = "nostalgebraist 2020, 'interpreting GPT: the logit lens'"
    description = "Decodes each layer's hidden state through the final norm and unembedding."
    requires_keys = ("prompt",)
    requires_capabilities = ()
    Params = LogitLensParams

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        return forward_cost(model, sample, forward=1 + model.n_layers * model.vocab_size // max(1, 6 * model.d_model * model.n_layers))

    @torch.inference_mode()
    def run(self, model: Any, sample: Sample, params: LogitLensParams, ctx: RunContext) -> MethodResult:
        prep = prepare(model, sample)
        enc = prep.enc
        n_pos = enc.prompt_len if model.kind != "seq2seq" else enc.decoder_input_ids.shape[1]
        positions = list(range(n_pos)) if params.positions == "all" and model.kind == "causal" else [enc.pred_pos]
        with Hooks(model) as h:
            caps = [h.read(site(layer, "resid_post"), positions=positions) for layer in range(model.n_layers)]
            model.forward(**enc.inputs())
        target = enc.target_ids[0]
        k = min(params.top_k, model.vocab_size)
        last_idx = positions.index(enc.pred_pos)
        probs_t, ranks_t, top_ids, top_probs = [], [], [], []
        for layer, cap in enumerate(caps):
            logp = model.readout(cap.value[0]).float().log_softmax(-1)  # [P, V]
            tp = logp[:, target]
            probs_t.append(tp.exp())
            ranks_t.append((logp > tp[:, None]).sum(-1) + 1)
            values, ids = logp.topk(k, dim=-1)
            top_ids.append(ids)
            top_probs.append(values.exp())
            ctx.progress((layer + 1) / model.n_layers, f"layer {layer}")
        target_prob = [float(p[last_idx]) for p in probs_t]
        target_rank = [int(r[last_idx]) for r in ranks_t]
        tok = model.tokenizer
        pos_tokens = [prep.tokens[p] if p < len(prep.tokens) else "" for p in positions]
        result = self.new_result(params)
        first_top = next((i for i, r in enumerate(target_rank) if r == 1), None)
        result.findings = {
            "target": prep.answer, "target_token": tok.decode([target]), "answer_source": prep.answer_source,
            "position": enc.pred_pos, "target_prob": target_prob, "target_rank": target_rank,
            "first_top1_layer": first_top,
            "layer_scores": [{"layer": i, "score": p} for i, p in enumerate(target_prob)],
            "top_tokens": [[tok.decode([int(i)]) for i in top_ids[layer][last_idx]] for layer in range(model.n_layers)],
            "positions": positions, "tokens": pos_tokens,
            "top1_grid": [[tok.decode([int(top_ids[layer][j][0])]) for j in range(len(positions))] for layer in range(model.n_layers)],
            "top1_prob_grid": [[float(top_probs[layer][j][0]) for j in range(len(positions))] for layer in range(model.n_layers)],
        }
        answer = tok.decode([target])
        final = target_prob[-1]
        if first_top is None:
            peak = max(range(model.n_layers), key=lambda i: target_prob[i])
            result.summary = (f"{answer!r} never becomes the top token at the last position; its probability peaks at "
                              f"{target_prob[peak]:.3f} in layer {peak} (rank {target_rank[peak]}) and ends at {final:.3f}.")
        else:
            result.summary = (f"{answer!r} ({prep.answer_source}) becomes the most likely next token from layer {first_top} "
                              f"of {model.n_layers} on (p={target_prob[first_top]:.3f} there, {final:.3f} at the output); "
                              f"before that, its best rank is {min(target_rank[:first_top] or [1])}.")
        layers = list(range(model.n_layers))
        if len(positions) > 1:
            result.add_figure("Top token per layer and position", figures.heatmap(
                result.findings["top1_prob_grid"], x=[f"{j}:{t}" for j, t in zip(positions, pos_tokens)], y=layers,
                text=result.findings["top1_grid"], title="Logit lens: top-1 token (colour: its probability)",
                x_title="position", y_title="layer", colorbar="p"))
        result.add_figure("Answer probability and rank by layer", figures.lines(
            layers, {f"P({answer})": target_prob}, title=f"Logit lens at the last position: P({answer!r}) by layer",
            x_title="layer", y_title="probability"))
        result.add_table("Top tokens at the last position", ["layer", f"P({answer})", "rank", "top tokens"],
                         [[i, round(target_prob[i], 5), target_rank[i], " | ".join(result.findings["top_tokens"][i])] for i in layers])
        return result
