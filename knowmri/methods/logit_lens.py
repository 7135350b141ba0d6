"""Logit lens (nostalgebraist 2020): read every layer's residual stream through the final norm
and the unembedding, to see at which layer the answer appears."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import clean_pass, prepare
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
    reads_clean_pass = True

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """The clean pass, then every layer's states at the read positions through the final norm and the
        unembedding, in chunks of READOUT_CHUNK_BYTES of float32 logits (a chunk's logits and their
        log-softmax are the peak), each chunk ranked (top-k over the vocabulary)."""
        from knowmri.methods.costs import (
            clean_pass_bytes,
            clean_pass_passes,
            elementwise_seconds,
            prepare_passes,
            readout_pass,
            sample_shape,
            work_estimate,
        )

        p = params if isinstance(params, LogitLensParams) else LogitLensParams()
        shape = sample_shape(model, sample)
        n_pos = shape.prompt if p.positions == "all" and model.kind == "causal" else 1
        rows = model.n_layers * n_pos
        chunk = min(rows, max(1, READOUT_CHUNK_BYTES // (4 * model.vocab_size)))
        full, rest = divmod(rows, chunk)
        passes = [*prepare_passes(model, shape), *clean_pass_passes(model, shape, shape.answer + 1),
                  readout_pass(chunk, count=full), readout_pass(rest, count=1 if rest else 0)]
        ranking = elementwise_seconds(model, 2 * rows * model.vocab_size * 4, ops=12 * (full + 1))  # top-k, ranks
        return work_estimate(model, passes, seconds=ranking, memory=clean_pass_bytes(model, shape, shape.answer + 1))

    @torch.inference_mode()
    def run(self, model: Any, sample: Sample, params: LogitLensParams, ctx: RunContext) -> MethodResult:
        prep = prepare(model, sample, ctx=ctx)
        enc = prep.enc
        n_pos = enc.prompt_len if model.kind != "seq2seq" else enc.decoder_input_ids.shape[1]
        positions = list(range(n_pos)) if params.positions == "all" and model.kind == "causal" else [enc.pred_pos]
        clean = clean_pass(model, enc, ctx)
        target = enc.target_ids[0]
        k = min(params.top_k, model.vocab_size)
        last_idx = positions.index(enc.pred_pos)
        probs_t, ranks_t, top_ids, top1_ids, top1_probs = read_layers(
            model, clean.resid[:, positions], target, k, last_idx, ctx)
        target_prob = probs_t.tolist()
        target_rank = ranks_t.tolist()
        tok = model.tokenizer
        decoded: dict[int, str] = {}

        def decode(i: int) -> str:
            if i not in decoded:
                decoded[i] = tok.decode([i])
            return decoded[i]

        pos_tokens = [prep.tokens[p] if p < len(prep.tokens) else "" for p in positions]
        result = self.new_result(params)
        first_top = next((i for i, r in enumerate(target_rank) if r == 1), None)
        result.findings = {
            "target": prep.answer, "target_token": tok.decode([target]), "answer_source": prep.answer_source,
            "position": enc.pred_pos, "target_prob": target_prob, "target_rank": target_rank,
            "first_top1_layer": first_top,
            "layer_scores": [{"layer": i, "score": p} for i, p in enumerate(target_prob)],
            "top_tokens": [[decode(i) for i in row] for row in top_ids.tolist()],
            "positions": positions, "tokens": pos_tokens,
            "top1_grid": [[decode(i) for i in row] for row in top1_ids.tolist()],
            "top1_prob_grid": top1_probs.tolist(),
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


READOUT_CHUNK_BYTES = 1 << 27  # float32 logits of one batch of read-out rows (and as much again for log-probs)


def read_layers(model: Any, states: torch.Tensor, target: int, k: int, last_idx: int,
                ctx: RunContext | None = None) -> tuple[torch.Tensor, ...]:
    """Every layer's states [L, P, d_model] read out through the final norm and unembedding, in a
    few large batches (one [rows, d] x [d, vocab] product per batch, not one small one per layer):
    P(target) and its rank at position `last_idx` ([L] each), the `k` top token ids there
    ([L, k]) and the top-1 token and its probability at every position ([L, P])."""
    n_layers, n_pos = states.shape[:2]
    flat = states.reshape(n_layers * n_pos, states.shape[-1])
    chunk = max(1, READOUT_CHUNK_BYTES // (4 * model.vocab_size))
    last_rows = torch.arange(n_layers) * n_pos + last_idx
    probs, ranks, top_k = torch.empty(n_layers), torch.empty(n_layers, dtype=torch.int32), torch.empty(n_layers, k, dtype=torch.long)
    top1_ids, top1_probs = torch.empty(n_layers * n_pos, dtype=torch.long), torch.empty(n_layers * n_pos)
    for start in range(0, flat.shape[0], chunk):
        stop = min(start + chunk, flat.shape[0])
        logp = model.readout(flat[start:stop]).float().log_softmax(-1)  # [rows, V]
        values, ids = logp.topk(k, dim=-1)
        top1_ids[start:stop], top1_probs[start:stop] = ids[:, 0].cpu(), values[:, 0].exp().cpu()
        here = ((last_rows >= start) & (last_rows < stop)).nonzero().flatten()
        if len(here):
            rows = (last_rows[here] - start).to(logp.device)
            tp = logp[rows, target]
            probs[here] = tp.exp().cpu()
            ranks[here] = ((logp[rows] > tp[:, None]).sum(-1, dtype=torch.int32) + 1).cpu()
            top_k[here] = ids[rows].cpu()
        if ctx is not None:
            ctx.progress(stop / flat.shape[0], f"layer {(stop - 1) // n_pos}")
    return probs, ranks, top_k, top1_ids.view(n_layers, n_pos), top1_probs.view(n_layers, n_pos)
