"""Attention weights: where each layer's heads look from the predicting position.

One forward with eager attention (switched on for the call and restored afterwards, since
fused kernels do not return weights) gives every layer's and head's attention pattern. From
the predicting position (the prompt's last token; BERT's [MASK]; for T5 the decoder position,
reading the encoder through cross-attention, as T5's decoder self-attention only sees the
decoder's own start token), heads are ranked by the attention mass on the subject's tokens,
or, without a subject, on the content tokens: not special tokens, not the first position
(the attention sink of causal models), not the predicting position itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import prepare
from knowmri.report import figures
from knowmri.sample import Sample


@dataclass
class AttentionWeightsParams(Params):
    top_k: int = field(default=10, metadata={"help": "heads listed in the table of top heads"})

    def validate(self) -> None:
        if not 1 <= self.top_k <= 1000:
            raise ValueError("top_k must be between 1 and 1000")


@contextmanager
def eager_attention(hf_model: Any) -> Iterator[None]:
    """Switch a Hugging Face model to eager attention (which returns weights) and back afterwards.

    Some models (Falcon) ignore `set_attn_implementation` and, under sdpa with
    `output_attentions=True`, compute non-causal weights; their config is switched directly.
    """
    config = hf_model.config
    previous = getattr(config, "_attn_implementation", None)
    can = getattr(hf_model, "_can_set_attn_implementation", lambda: True)
    switched = forced = False
    if previous not in (None, "eager") and hasattr(hf_model, "set_attn_implementation") and can():
        hf_model.set_attn_implementation("eager")
        switched = True
    if getattr(config, "_attn_implementation", None) not in (None, "eager"):
        config._attn_implementation = "eager"
        forced = True
    try:
        yield
    finally:
        if forced:
            config._attn_implementation = previous
        elif switched:
            hf_model.set_attn_implementation(previous)


def attention_patterns(model: Any, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, [heads, queries, keys] attention weights of one input (cross-attention for seq2seq)."""
    with eager_attention(model.hf_model):
        out = model.run(**inputs, output_attentions=True, keep=1)  # no vocabulary read-out needed
    atts = out.cross_attentions if model.kind == "seq2seq" else out.attentions
    if not atts or any(a is None for a in atts) or len(atts) != model.n_layers:
        raise ValueError(f"{model.architecture} did not return attention weights")
    return [a[0].float().cpu() for a in atts]


@register_method
class AttentionWeights(Method):
    name = "attention_weights"
    title = "Attention weights"
    path = ("Internal", "Module", "Attention")
    paper = "attention maps per layer and head (e.g. Clark et al. 2019, 'What does BERT look at?')"
    description = "Shows which tokens each layer's heads attend to from the predicting position."
    requires_keys = ("prompt",)
    requires_capabilities = ()
    Params = AttentionWeightsParams

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """One forward with eager attention, every layer's [heads, T, T] weights returned and kept (float32)."""
        from knowmri.methods.costs import Dims, Pass, prepare_passes, sample_shape, work_estimate

        shape = sample_shape(model, sample)
        dims = Dims.of(model)
        queries = shape.prompt if model.kind == "causal" else shape.positions
        keys = shape.prompt if model.kind == "causal" else shape.input
        tokens = shape.prompt if model.kind == "causal" else shape.input + shape.decoder
        weights = dims.layers * dims.heads * queries * keys * (dims.bytes + (4 if dims.bytes < 4 else 0))
        passes = [*prepare_passes(model, shape), Pass(tokens=tokens, readout=1)]
        return work_estimate(model, passes, memory=weights + 4 * dims.layers * dims.heads * keys * 3)

    @torch.inference_mode()
    def run(self, model: Any, sample: Sample, params: AttentionWeightsParams, ctx: RunContext) -> MethodResult:
        prep = prepare(model, sample, ctx=ctx)
        enc, span = prep.enc, prep.subject
        if model.kind == "causal":
            n_tok = enc.prompt_len
            inputs = {"input_ids": enc.input_ids[:, :n_tok], "attention_mask": enc.attention_mask[:, :n_tok]}
        else:
            n_tok = enc.input_ids.shape[1]
            inputs = enc.inputs()
        pos = enc.pred_pos
        tokens = prep.tokens[:n_tok]
        patterns = attention_patterns(model, inputs)
        per_head = torch.stack([p[:, pos, :n_tok] for p in patterns])  # [L, H, T]
        L, H = per_head.shape[:2]
        ids = inputs["input_ids"][0].tolist()
        special = set(model.tokenizer.all_special_ids)
        excluded = {t for t in range(n_tok) if ids[t] in special}
        if model.kind == "causal":
            excluded.add(0)
        if span is not None:
            targets, basis = list(span), "subject"
        else:
            own = {pos} if model.kind != "seq2seq" else set()
            targets, basis = [t for t in range(n_tok) if t not in excluded | own], "content tokens"
        head_scores = per_head[:, :, targets].sum(-1) if targets else torch.zeros(L, H)
        order = torch.argsort(head_scores.flatten(), descending=True).tolist()
        heads = [{"layer": i // H, "head": i % H, "score": float(head_scores.flatten()[i])} for i in order]
        mean = per_head.mean((0, 1))
        kept = [t for t in range(n_tok) if t not in excluded]
        result = self.new_result(params)
        result.findings = {
            "last_token_attention": per_head.mean(1).tolist(),
            "last_token_attention_per_head": per_head.tolist(),
            "heads": heads, "head_score_basis": basis,
            "token_scores": [{"index": t, "token": tokens[t], "score": float(mean[t])} for t in kept],
            "layer_scores": [{"layer": layer, "score": float(head_scores[layer].max())} for layer in range(L)],
            "layer_scores_basis": f"the layer's best head's attention mass on the {basis}",
            "excluded_positions": sorted(excluded), "excluded_attention": float(mean[sorted(excluded)].sum()),
            "tokens": tokens, "position": pos, "subject_span": None if span is None else {"start": span.start,
                                                                                         "stop": span.stop},
            "source": "decoder cross-attention to the encoder" if model.kind == "seq2seq" else "self-attention",
        }
        result.summary = _summary(heads, mean, kept, excluded, tokens, pos, basis, sample, model.kind)
        labels = [f"{t}:{tok}{'*' if span is not None and t in span else ''}" for t, tok in enumerate(tokens)]
        result.add_figure("Attention from the predicting position", figures.heatmap(
            result.findings["last_token_attention"], x=labels, y=list(range(L)), colorscale="Blues",
            title=f"Attention from position {pos} ({tokens[pos] if pos < len(tokens) else 'decoder'!r}), "
                  "mean over heads", x_title="token (* subject)", y_title="layer", zmin=0, colorbar="weight"))
        result.add_figure(f"Attention to the {basis} per head", figures.heatmap(
            head_scores.T.tolist(), x=list(range(L)), y=list(range(H)), colorscale="Oranges", zmin=0,
            title=f"Attention mass on the {basis}, from the predicting position", x_title="layer",
            y_title="head", colorbar="mass"))
        top = heads[0]
        pattern = patterns[top["layer"]][top["head"]]
        queries = [f"dec {q}" for q in range(pattern.shape[0])] if model.kind == "seq2seq" else labels
        result.add_figure("Top head's attention pattern", figures.heatmap(
            pattern[:, :n_tok].tolist(), x=labels, y=queries, colorscale="Blues", zmin=0, zmax=1,
            title=f"Attention pattern of layer {top['layer']} head {top['head']} (top head)",
            x_title="key token", y_title="query", colorbar="weight", reverse_y=True))
        result.add_table("Top heads", ["layer", "head", f"attention to the {basis}", "most-attended token"],
                         [[h["layer"], h["head"], round(h["score"], 5),
                           tokens[int(per_head[h["layer"], h["head"]].argmax())]] for h in heads[:params.top_k]])
        result.add_table("Attention per token (mean over layers and heads)", ["index", "token", "attention", "note"],
                         [[t, tokens[t], round(float(mean[t]), 5), "sink/special" if t in excluded else ""]
                          for t in range(n_tok)])
        return result


def _summary(heads: list[dict], mean: torch.Tensor, kept: list[int], excluded: set[int], tokens: list[str],
             pos: int, basis: str, sample: Sample, kind: str) -> str:
    where = "the decoder's predicting position" if kind == "seq2seq" else f"the predicting position {tokens[pos]!r}"
    top = heads[0]
    what = f"the subject {sample.get('triple_subject')!r}" if basis == "subject" else "the content tokens"
    text = (f"From {where}, layer {top['layer']} head {top['head']} attends most to {what} "
            f"({top['score']:.2f} of its attention)")
    if len(heads) > 1:
        second = heads[1]
        text += f", then layer {second['layer']} head {second['head']} ({second['score']:.2f})"
    text += "."
    ranked = sorted(kept, key=lambda t: -float(mean[t]))[:3]
    if ranked:
        listed = ", ".join(f"{tokens[t]!r} ({float(mean[t]):.2f})" for t in ranked)
        text += f" Averaged over all layers and heads, the most-attended tokens are {listed}"
        if excluded:
            text += (f"; the first position and special tokens (excluded from this ranking) take "
                     f"{float(mean[sorted(excluded)].sum()):.2f}")
        text += "."
    return text
