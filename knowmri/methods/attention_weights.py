"""Attention weights: where each layer's heads look from the predicting position.

One forward with eager attention (switched on for the call and restored afterwards, since
fused kernels do not return weights) gives every layer's and head's attention pattern. From
the predicting position (the prompt's last token; BERT's [MASK]; for T5 the decoder position,
reading the encoder through cross-attention, as T5's decoder self-attention only sees the
decoder's own start token), heads are ranked by the attention mass on the subject's tokens,
or, without a subject, on the content tokens: not special tokens, not attention sinks, not the
predicting position itself.

Attention sinks (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks")
are positions that take most of the attention from almost every query in many heads, whatever
the query is about: the first token of a causal model (SmolLM2 adds no BOS token, so that is the
prompt's first word, often the subject's), BERT's [CLS]/[SEP]. Attention parked there is a head's
"no-op", not a reading of that token, so `attention_sinks` finds them from the patterns of all
queries and they are kept out of the head ranking, the layer scores and the token ranking; a
subject whose only tokens are sinks leaves the content tokens as the basis.
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


SINK_MASS = 0.3  # a sink takes at least this share of a query's attention ...
SINK_OVER_UNIFORM = 1.5  # ... and 1.5 times the uniform share (1 / visible keys)
SINK_MIN_KEYS = 4  # queries that see fewer keys cannot tell a sink from uniform attention
SINK_QUERIES = 0.5  # a sink in a head: so in more than half of the queries that qualify
SINK_HEADS = 0.4  # a sink: one in more than this share of all heads (SmolLM2's position 0: 58-86% of heads on
# 15 prompts, early layers attend elsewhere; no other position above 24%)


def attention_sinks(patterns: list[torch.Tensor], kind: str) -> tuple[list[int], list[float]]:
    """Sink positions of [heads, queries, keys] patterns (one per layer; cross-attention for "seq2seq"), and for
    every key the share of heads in which it is a sink. A key is a sink in a head when, in most of the queries
    that can see it (later ones in a "causal" model, all others in a "masked" one, every decoder position in
    cross-attention) and see at least SINK_MIN_KEYS keys, it takes at least SINK_MASS and SINK_OVER_UNIFORM
    times the uniform share of the attention; it is a sink when it is one in more than SINK_HEADS of them."""
    weights = torch.cat(patterns).float()  # [L*H, Q, K]
    n_q, n_k = weights.shape[1:]
    keys = torch.arange(n_k)
    queries = torch.arange(n_q)[:, None]
    visible = (queries + 1).expand(n_q, n_k) if kind == "causal" else torch.full((n_q, n_k), n_k)
    if kind == "causal":
        sees = queries > keys
    elif kind == "seq2seq":
        sees = torch.ones(n_q, n_k, dtype=torch.bool)
    else:
        sees = queries != keys
    qualifies = sees & (visible >= SINK_MIN_KEYS)  # [Q, K]
    high = (weights >= SINK_MASS) & (weights >= SINK_OVER_UNIFORM / visible)  # [L*H, Q, K]
    counted = qualifies.sum(0)  # [K]
    share = (high & qualifies).sum(1) / counted.clamp_min(1)  # [L*H, K]: share of qualifying queries
    heads = (share > SINK_QUERIES).float().mean(0)  # [K]
    heads = torch.where(counted > 0, heads, torch.zeros_like(heads))
    return [int(k) for k in keys[heads > SINK_HEADS]], [round(float(h), 4) for h in heads]


def attention_patterns(model: Any, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, [heads, queries, keys] attention weights of one input (cross-attention for seq2seq)."""
    with eager_attention(model.hf_model):
        out = model.run(**inputs, output_attentions=True, keep=1)  # no vocabulary read-out needed
    atts = out.cross_attentions if model.kind == "seq2seq" else out.attentions
    if not atts or any(a is None for a in atts) or len(atts) != model.n_layers:
        raise ValueError(f"{model.architecture} did not return attention weights")
    return [a[0].float().cpu() for a in atts]


def batch_patterns(model: Any, prompts: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`attention_patterns` of several prompts of a causal model ([1, T] ids each) in one forward.

    The prompts are padded on the right: a causal query never attends to a later key, so each prompt's
    own queries and keys hold the weights its own forward gives (up to float rounding)."""
    lengths = [int(ids.shape[1]) for ids in prompts]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), max(lengths)), pad, dtype=prompts[0].dtype, device=prompts[0].device)
    for i, prompt in enumerate(prompts):
        ids[i, :lengths[i]] = prompt[0]
    with eager_attention(model.hf_model):
        out = model.run(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, keep=1)
    atts = out.attentions
    if not atts or any(a is None for a in atts) or len(atts) != model.n_layers:
        raise ValueError(f"{model.architecture} did not return attention weights")
    return [[a[i, :, :n, :n].float().cpu() for a in atts] for i, n in enumerate(lengths)]


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
        inputs, n_tok = self._inputs(model, prep)
        return self._result(model, sample, params, prep, inputs, n_tok, attention_patterns(model, inputs))

    @torch.inference_mode()
    def run_batch(self, model: Any, samples: list[Sample], params: AttentionWeightsParams,
                  contexts: list[RunContext]) -> list[MethodResult] | None:
        """Several samples' patterns from one forward of their prompts, padded on the right (causal models)."""
        if model.kind != "causal" or len(samples) < 2:
            return None
        preps = [prepare(model, sample, ctx=ctx) for sample, ctx in zip(samples, contexts)]
        inputs = [self._inputs(model, prep) for prep in preps]
        patterns = batch_patterns(model, [i["input_ids"] for i, _ in inputs])
        return [self._result(model, sample, params, prep, i, n_tok, pats)
                for sample, prep, (i, n_tok), pats in zip(samples, preps, inputs, patterns)]

    @staticmethod
    def _inputs(model: Any, prep: Any) -> tuple[dict[str, torch.Tensor], int]:
        """The forward's inputs (a causal model's: the prompt without the answer) and their token count."""
        enc = prep.enc
        if model.kind == "causal":
            n_tok = enc.prompt_len
            return {"input_ids": enc.input_ids[:, :n_tok], "attention_mask": enc.attention_mask[:, :n_tok]}, n_tok
        return enc.inputs(), enc.input_ids.shape[1]

    def _result(self, model: Any, sample: Sample, params: AttentionWeightsParams, prep: Any,
                inputs: dict[str, torch.Tensor], n_tok: int, patterns: list[torch.Tensor]) -> MethodResult:
        """One sample's result from its attention patterns."""
        enc, span = prep.enc, prep.subject
        pos = enc.pred_pos
        tokens = prep.tokens[:n_tok]
        per_head = torch.stack([p[:, pos, :n_tok] for p in patterns])  # [L, H, T]
        L, H = per_head.shape[:2]
        ids = inputs["input_ids"][0].tolist()
        special = set(model.tokenizer.all_special_ids)
        sinks, sink_heads = attention_sinks([p[..., :n_tok] for p in patterns], model.kind)
        excluded = {t for t in range(n_tok) if ids[t] in special} | set(sinks)
        own = {pos} if model.kind != "seq2seq" else set()
        subject = [t for t in span if t not in excluded] if span is not None else []
        if subject:
            targets, basis = subject, "subject"
        else:
            targets, basis = [t for t in range(n_tok) if t not in excluded | own], "content tokens"
        head_scores = per_head[:, :, targets].sum(-1) if targets else torch.zeros(L, H)
        beyond = 1.0 - per_head[:, :, sorted(excluded)].sum(-1)  # [L, H] attention not on sinks/special tokens
        shares = head_scores / beyond.clamp_min(1e-6)
        order = torch.argsort(head_scores.flatten(), descending=True).tolist()
        heads = [{"layer": i // H, "head": i % H, "score": float(head_scores.flatten()[i]),
                  "share": min(1.0, float(shares.flatten()[i]))} for i in order]
        mean = per_head.mean((0, 1))
        kept = [t for t in range(n_tok) if t not in excluded]
        result = self.new_result(params)
        result.findings = {
            "last_token_attention": per_head.mean(1).tolist(),
            "last_token_attention_per_head": per_head.tolist(),
            "heads": heads, "head_score_basis": basis,
            "token_scores": [{"index": t, "token": tokens[t], "score": float(mean[t])} for t in kept],
            "layer_scores": [{"layer": layer, "score": float(head_scores[layer].max())} for layer in range(L)],
            "layer_scores_basis": f"the layer's best head's attention mass on the {basis} (sinks left out)",
            "sinks": sinks, "sink_heads": sink_heads[:n_tok], "sink_attention": float(mean[sinks].sum()),
            "excluded_positions": sorted(excluded), "excluded_attention": float(mean[sorted(excluded)].sum()),
            "tokens": tokens, "position": pos, "subject_span": None if span is None else {"start": span.start,
                                                                                         "stop": span.stop},
            "source": "decoder cross-attention to the encoder" if model.kind == "seq2seq" else "self-attention",
        }
        result.summary = _summary(heads, mean, kept, excluded, tokens, pos, basis, sample, model.kind, sinks,
                                  [sink_heads[t] for t in sinks], subject_at_sinks=span is not None and not subject)
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
        kept_t = torch.tensor(kept, dtype=torch.long)
        result.add_table("Top heads", ["layer", "head", f"attention to the {basis}", "share beyond sinks",
                                       "most-attended token beyond sinks"],
                         [[h["layer"], h["head"], round(h["score"], 5), round(h["share"], 4),
                           tokens[kept[int(per_head[h["layer"], h["head"], kept_t].argmax())]] if kept else ""]
                          for h in heads[:params.top_k]])
        result.add_table("Attention per token (mean over layers and heads)", ["index", "token", "attention", "note"],
                         [[t, tokens[t], round(float(mean[t]), 5), _note(t, sinks, excluded)] for t in range(n_tok)])
        return result


def _note(t: int, sinks: list[int], excluded: set[int]) -> str:
    return "attention sink" if t in sinks else "special token" if t in excluded else ""


def _summary(heads: list[dict], mean: torch.Tensor, kept: list[int], excluded: set[int], tokens: list[str],
             pos: int, basis: str, sample: Sample, kind: str, sinks: list[int], sink_heads: list[float],
             subject_at_sinks: bool) -> str:
    where = "the decoder's predicting position" if kind == "seq2seq" else f"the predicting position {tokens[pos]!r}"
    top = heads[0]
    what = f"the subject {sample.get('triple_subject')!r}" if basis == "subject" else "the content tokens"
    text = ""
    if sinks:
        listed = ", ".join(f"{t} ({tokens[t]!r})" for t in sinks)
        text = (f"Position{'s' if len(sinks) > 1 else ''} {listed} {'are' if len(sinks) > 1 else 'is an'} attention "
                f"sink{'s' if len(sinks) > 1 else ''}: {'at least ' if len(sinks) > 1 else ''}{min(sink_heads):.0%} "
                f"of the heads park most of almost every query's attention there ({float(mean[sinks].sum()):.2f} of the predicting "
                f"position's, on average), so "
                f"{'they are' if len(sinks) > 1 else 'it is'} left out of the rankings below. ")
    if subject_at_sinks:
        text += "The subject's only tokens are sinks or special tokens, so heads are ranked by the content tokens. "
    text += (f"From {where}, layer {top['layer']} head {top['head']} attends most to {what} "
             f"({top['score']:.2f} of its attention, {top['share']:.2f} of what it gives beyond sinks and special "
             "tokens)")
    if len(heads) > 1:
        second = heads[1]
        text += f", then layer {second['layer']} head {second['head']} ({second['score']:.2f})"
    text += "."
    ranked = sorted(kept, key=lambda t: -float(mean[t]))[:3]
    if ranked:
        listed = ", ".join(f"{tokens[t]!r} ({float(mean[t]):.2f})" for t in ranked)
        text += f" Averaged over all layers and heads, the most-attended tokens are {listed}"
        if excluded:
            text += (f"; the sinks and special tokens (excluded from this ranking) take "
                     f"{float(mean[sorted(excluded)].sum()):.2f}")
        text += "."
    return text
