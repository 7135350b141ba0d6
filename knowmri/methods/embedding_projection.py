"""Embedding projection (Dar et al. 2022, "Analyzing Transformers in Embedding Space"): read hidden states
and parameters in the vocabulary by multiplying them with the embedding matrices, with no training.

Four views of one prompt: (1) the residual stream of every layer at the prediction position read in the
vocabulary; (2) the value vectors of the MLP neurons that write most at that position (|activation| x
||value vector||), signed by their activation, read as tokens; (3) the OV circuits W_V W_O of the heads that
write most there, applied to the prompt's token embeddings and read through the unembedding (which token each
head would write when it attends to a token); (4) the nearest neighbours of the prompt's tokens in the input
embedding space, with a PCA map of them.

The final norm. Dar et al. multiply parameters (MLP keys and values, W_V W_O, W_Q W_K) by the embedding
matrix with no norm at all (their released code reads e.g. a value vector as `v @ E`, with no final layer
norm). In a pre-norm model, though, the model itself reads its last layer only through the final norm, whose
per-dimension gain (and LayerNorm's centring) changes the ranking: read without it, SmolLM2-135M's last layer
ranks the model's own top answer at a median of ~7,450 over 40 facts it knows (first in none), and through it
first in all 40. So where the model has a final norm, vectors are read through it by default (as the logit
lens does; its per-vector scale does not change a ranking), and the raw projection of the residual stream is
shown beside it (`final_norm=False` makes the raw one the main reading). The findings warn when the last
layer's reading disagrees with the model's actual output, and `holds` is False when the answer never enters
the top MEANINGFUL_RANK tokens at any layer (no layer is then located).

`run` takes these as named steps; the products, and the choice of neurons and the heads' outputs they read,
are in `projection_engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from knowmri import neuron_units
from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import clean_pass, prepare
from knowmri.methods.projection_engine import (
    PROJECT_CHUNK_BYTES,
    RankTables,
    TokenNames,
    VocabularyReader,
    answer_ranks,
    head_output_norms,
    head_table,
    neighbour_map,
    ov_outputs,
    prompt_token_ids,
    top_neurons,
)
from knowmri.models.model import Encoded
from knowmri.report import figures
from knowmri.sample import Sample

MEANINGFUL_RANK = 10  # an answer that never ranks this high at any layer is not read by the projection


@dataclass
class EmbeddingProjectionParams(Params):
    top_k: int = field(default=5, metadata={"help": "vocabulary tokens listed per vector"})
    position: int = field(
        default=-1,
        metadata={"help": "input position read (residual stream, neurons, heads): -1 = the one predicting the answer"},
    )
    final_norm: bool = field(
        default=True,
        metadata={
            "help": "read through the model's final norm before the unembedding, as the model reads its last "
            "layer (the logit lens); off: the raw projection by the unembedding alone (Dar et al.). "
            "The residual stream is shown both ways"
        },
    )
    top_neurons: int = field(
        default=10, metadata={"help": "MLP neurons shown (largest |activation| x ||value vector||)"}
    )
    top_heads: int = field(default=3, metadata={"help": "heads shown when `heads` is empty (largest output norm)"})
    heads: list = field(
        default_factory=list, metadata={"help": "heads to read as 'layer.head' (e.g. 3.1,5.0); empty: top_heads"}
    )
    n_neighbours: int = field(default=8, metadata={"help": "nearest embedding neighbours per prompt token"})
    map_dims: int = field(default=2, metadata={"help": "dimensions of the neighbour map (2 or 3)", "choices": [2, 3]})

    def validate(self) -> None:
        for name, low, high in (
            ("top_k", 1, 50),
            ("top_neurons", 0, 200),
            ("top_heads", 0, 50),
            ("n_neighbours", 1, 50),
        ):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be between {low} and {high}")
        if self.map_dims not in (2, 3):
            raise ValueError("map_dims must be 2 or 3")
        parse_heads(self.heads)


def parse_heads(items: list) -> list[tuple[int, int]]:
    """'layer.head' strings (or (layer, head) pairs) as pairs of ints."""
    out = []
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            out.append((int(item[0]), int(item[1])))
            continue
        parts = str(item).replace(":", ".").split(".")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"heads are given as 'layer.head' (e.g. 3.1), got {item!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


@register_method
class EmbeddingProjection(Method):
    name = "embedding_projection"
    title = "Embedding-space projection"
    path = ("Internal", "Representation", "Parameters")
    paper = "Dar et al. 2022, 'Analyzing Transformers in Embedding Space'"
    description = (
        "Reads residual states, MLP value vectors, attention OV circuits and token neighbours in the vocabulary."
    )
    requires_keys = ("prompt",)
    requires_capabilities = ()
    Params = EmbeddingProjectionParams
    reads_clean_pass = True

    def check(self, model: Any, sample: Sample) -> list[str]:
        return [] if model.spec.qkv else [f"{model.architecture} has no q/k/v map (archs.toml `qkv`)"]

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """The clean pass (with heads); the value-vector and embedding norms (once per process); the
        vectors read in the vocabulary (every layer's residual, twice with a final norm, the top neurons, the
        chosen heads' OV circuit per prompt token, the prompt tokens' embeddings) projected in chunks of
        PROJECT_CHUNK_BYTES, whose float32 scores and the rank grid [layers, top_k, vocab] are the peak."""
        from knowmri.methods.costs import (
            Dims,
            clean_pass_bytes,
            clean_pass_passes,
            elementwise_seconds,
            matmul_seconds,
            prepare_passes,
            readout_pass,
            sample_shape,
            work_estimate,
        )

        p = params if isinstance(params, EmbeddingProjectionParams) else EmbeddingProjectionParams()
        shape = sample_shape(model, sample)
        dims = Dims.of(model)
        unique = shape.prompt  # distinct prompt tokens (at most)
        heads = len(p.heads) if p.heads else min(p.top_heads, dims.layers * dims.heads)
        both = 2 if model.final_norm is not None else 1  # the residual stream is read with and without the norm
        rows = both * dims.layers + p.top_neurons + heads * unique + unique
        chunk = min(rows, max(1, PROJECT_CHUNK_BYTES // (4 * dims.vocab)))
        full, rest = divmod(rows, chunk)
        passes = [*prepare_passes(model, shape), *clean_pass_passes(model, shape, shape.answer + 1),
                  readout_pass(chunk, count=full), readout_pass(rest, count=1 if rest else 0)]
        norms = elementwise_seconds(model, (dims.layers * dims.d_mlp + dims.vocab) * dims.d * dims.bytes * 2,
                                    ops=4 * dims.layers)  # value and embedding norms, first use only
        ov = heads * matmul_seconds(model, 2 * unique * dims.d * dims.d_head * 2, unique)
        ranks = elementwise_seconds(model, (p.top_k + 4) * dims.layers * dims.vocab * 4, ops=30 + 10 * dims.layers)
        kept = 4 * chunk * dims.vocab + (p.top_k + 1) * dims.layers * dims.vocab + 8 * unique * dims.vocab
        if dims.bytes < 4:  # the embedding norms (first use) take a float32 copy of the embedding
            kept += 4 * dims.vocab * dims.d
        return work_estimate(model, passes, seconds=norms + ov + ranks, resident=kept + clean_pass_bytes(model, shape, shape.answer + 1),
                             memory=clean_pass_bytes(model, shape, shape.answer + 1))

    @torch.inference_mode()
    def run(self, model: Any, sample: Sample, params: EmbeddingProjectionParams, ctx: RunContext) -> MethodResult:
        prep = prepare(model, sample, ctx=ctx)
        pos = read_position(prep.enc, params.position)
        clean = clean_pass(model, prep.enc, ctx, positions=[pos], heads=True)  # shared with the other light methods
        row = clean.rows([pos])[0]
        resid = clean.resid[:, pos]  # [L, d_model]
        # What is read in the vocabulary (projected together, in a few large products): (1) the residual
        # stream of every layer at the position, (2) the top neurons' value vectors, (3) the chosen heads' OV
        # circuits applied to the prompt's tokens, (4) those tokens' nearest input-embedding neighbours.
        ctx.progress(0.2, "MLP neurons")
        neurons = top_neurons(model, clean.neurons[:, row], params.top_neurons)
        ctx.progress(0.4, "attention heads")
        token_ids = prompt_token_ids(model, prep.enc)
        head_norms = head_output_norms(model, clean.heads[:, row])  # [L, H]
        chosen = choose_heads(model, params, head_norms)
        ovs = ov_outputs(model, chosen, token_ids)
        ctx.progress(0.6, "vocabulary projections")
        reader = VocabularyReader(model, token_ids, final_norm=params.final_norm, top_k=params.top_k,
                                  n_neighbours=params.n_neighbours)
        read = reader.read(resid, neurons.vectors, ovs)
        ctx.progress(0.8, "tables")
        names = TokenNames(model.tokenizer)
        ranks = RankTables.of(read.logits, prep.enc.target_ids[0], reader.k)
        other_rank = ranks.target_rank if read.other_logits is None else answer_ranks(read.other_logits, ranks.target)
        model_top = int(clean.logits[row].argmax())
        neuron_rows = [{"layer": layer, **neuron_units.fields(model, layer, unit), "score": score, "activation": act, "tokens": names(ids)}
                       for (layer, unit, score, act), ids in zip(neurons.picked, read.neuron_ids)]
        head_rows = head_table(chosen, head_norms, token_ids, read.ov_ids, names)
        neighbours = {names.one(t): names(ids) for t, ids in zip(token_ids, read.neighbour_ids)}
        map_fig = neighbour_map(reader.emb, reader.row_norms, token_ids, read.neighbour_ids, model.tokenizer,
                                 params.map_dims)
        result = self.new_result(params)
        result.findings = {
            "target": prep.answer,
            "target_token": model.tokenizer.decode([ranks.target]),
            "answer_source": prep.answer_source,
            "position": pos,
            "final_norm": reader.final_norm,
            "layer_tokens": [names(ids) for ids in ranks.layer_top],
            "target_rank": ranks.target_rank,
            "target_rank_final_norm": ranks.target_rank if reader.final_norm else other_rank,
            "target_rank_direct": other_rank if reader.final_norm else ranks.target_rank,
            "target_score": ranks.target_score,
            "first_top1_layer": ranks.first_top,
            "model_top_token": names.one(model_top),
            "last_layer_top_token": names.one(int(ranks.layer_top[-1, 0])),
            "agrees_with_output": int(ranks.layer_top[-1, 0]) == model_top,
            "holds": min(ranks.target_rank) <= MEANINGFUL_RANK,
            "layer_scores": [{"layer": i, "score": 1.0 / r} for i, r in enumerate(ranks.target_rank)],
            "neurons": neuron_rows,
            "heads": head_rows,
            "neighbours": neighbours,
            "neighbour_similarity": {
                names.one(t): [round(v, 4) for v in row] for t, row in zip(token_ids, read.neighbour_sims.tolist())
            },
        }
        result.findings["warnings"] = _warnings(result.findings, has_norm=read.other_logits is not None)
        result.summary = _summary(result.findings, ranks, at_prediction=pos == prep.enc.pred_pos)
        _add_figures_and_tables(result, model, ranks, map_fig, has_norm=read.other_logits is not None)
        result.arrays["residual_logits_top"] = read.logits.topk(reader.k, dim=-1).values.cpu().numpy()
        return result


def read_position(enc: Encoded, position: int) -> int:
    """The input position read: the one predicting the answer (-1), else `position` (negative from the end)."""
    if position == -1:
        return enc.pred_pos
    length = enc.read_ids.shape[1]
    if not -length <= position < length:
        raise ValueError(f"position {position} is out of range for {length} tokens")
    return position % length


def choose_heads(model: Any, params: EmbeddingProjectionParams, head_norms: torch.Tensor) -> list[tuple[int, int]]:
    """The heads read: `params.heads`, else the `top_heads` with the largest output norm."""
    chosen = parse_heads(params.heads)
    for layer, head in chosen:
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
            raise ValueError(
                f"head {layer}.{head} does not exist: the model has {model.n_layers} layers of {model.n_heads} heads"
            )
    if not chosen and params.top_heads:
        order = head_norms.flatten().topk(min(params.top_heads, head_norms.numel())).indices
        chosen = [(int(i) // model.n_heads, int(i) % model.n_heads) for i in order]
    return chosen


def how_read(final_norm: bool) -> str:
    return "through the final norm" if final_norm else "directly by the unembedding"


def _warnings(f: dict[str, Any], has_norm: bool) -> list[str]:
    """Caveats: the last layer's reading is not the model's output; the answer never ranks high."""
    out = []
    if not f["agrees_with_output"]:
        fix = " (read it through the final norm, final_norm=True)" if has_norm and not f["final_norm"] else ""
        out.append(f"Projected {how_read(f['final_norm'])}, the last layer's top token is "
                   f"{f['last_layer_top_token']!r} but the model outputs {f['model_top_token']!r}: this reading "
                   f"is not what the model reads from its residual stream{fix}.")
    if not f["holds"]:
        out.append(f"{f['target_token']!r} never ranks in the top {MEANINGFUL_RANK} at any layer (best "
                   f"{min(f['target_rank'])}), so no layer is located.")
    return out


def _summary(f: dict[str, Any], ranks: RankTables, at_prediction: bool) -> str:
    target_rank, first_top, answer = ranks.target_rank, ranks.first_top, f["target_token"]
    where = (
        f"it first becomes the top token at layer {first_top}"
        if first_top is not None
        else f"it is never the top token; its best rank is {min(target_rank)} (layer {int(np.argmin(target_rank))})"
    )
    at = "the position predicting the answer" if at_prediction else f"position {f['position']}"
    parts = [
        f"Projected {how_read(f['final_norm'])}, the residual stream at {at} ranks {answer!r} ({f['answer_source']}) "
        f"{target_rank[0]} after layer 0 and {target_rank[-1]} after the last layer; {where}."
    ]
    other = f["target_rank_direct"] if f["final_norm"] else f["target_rank_final_norm"]
    if other != target_rank:
        parts.append(f"Projected {how_read(not f['final_norm'])} instead, it ranks {other[-1]} after the last layer "
                     f"(best {min(other)}).")
    parts.extend(f"Warning: {w}" for w in f["warnings"])
    if f["neurons"]:
        n0 = f["neurons"][0]
        parts.append(
            f"The neuron writing most there is L{n0['layer']}.{'E' + str(n0['expert']) + '.' if 'expert' in n0 else ''}"
            f"{n0['unit']}, whose value vector promotes "
            f"{', '.join(map(repr, n0['tokens'][:3]))}."
        )
    if f["heads"]:
        best = max(f["heads"], key=lambda r: r["copying"])
        parts.append(
            f"Of the heads read, {best['layer']}.{best['head']} copies the most prompt tokens "
            f"({best['copying']:.0%} map to themselves through W_V W_O)."
        )
    return " ".join(parts)


def _add_figures_and_tables(result: MethodResult, model: Any, ranks: RankTables, map_fig: Any, has_norm: bool) -> None:
    f, tok = result.findings, model.tokenizer
    how, other_how = how_read(f["final_norm"]), how_read(not f["final_norm"])
    answer, target_rank, layer_tokens = f["target_token"], ranks.target_rank, f["layer_tokens"]
    other = f["target_rank_direct"] if f["final_norm"] else f["target_rank_final_norm"]
    both = has_norm
    layers = list(range(model.n_layers))
    series = {f"projected {how}": target_rank, **({f"projected {other_how}": other} if both else {})}
    ranks_fig = figures.lines(layers, series, title=f"Rank of {answer!r} by layer (1 = top)", x_title="layer",
                              y_title="rank (log scale)")
    ranks_fig["layout"]["yaxis"]["type"] = "log"
    ranks_fig["layout"]["yaxis"]["autorange"] = "reversed"
    result.add_figure("Rank of the answer by layer, with and without the final norm", ranks_fig)
    result.add_figure(
        "Rank of the answer and the final top tokens by layer",
        figures.heatmap(
            [[float(np.log10(r)) for r in row] for row in ranks.rank_grid],
            x=[repr(tok.decode([i])) for i in ranks.shown],
            y=layers,
            text=[[str(r) for r in row] for row in ranks.rank_grid],
            colorscale="Blues_r",
            colorbar="log10 rank",
            title=f"Residual stream projected {how}: rank of each token (1 = top)",
            x_title="token",
            y_title="layer",
        ),
    )
    result.add_figure("Prompt tokens and their embedding neighbours", map_fig)
    result.add_table(
        "Residual stream in the vocabulary",
        ["layer", f"rank of {answer!r} ({how})", *([f"rank ({other_how})"] if both else []), "top tokens"],
        [[i, target_rank[i], *([other[i]] if both else []), " | ".join(layer_tokens[i])] for i in layers],
    )
    result.add_table(
        "Most active MLP neurons",
        ["layer", "unit", "activation", "score", "tokens promoted"],
        [
            [r["layer"], r["unit"] if "expert" not in r else f"E{r['expert']}.U{r['unit']}", round(r["activation"], 4), round(r["score"], 4), " | ".join(r["tokens"])]
            for r in f["neurons"]
        ],
    )
    result.add_table(
        "Attention OV circuits",
        ["head", "output norm", "copying", "token -> writes"],
        [
            [
                f"{r['layer']}.{r['head']}",
                round(r["score"], 4),
                round(r["copying"], 3),
                "; ".join(f"{c['token']} -> {c['writes'][0]}" for c in r["copies"]),
            ]
            for r in f["heads"]
        ],
    )
    result.add_table(
        "Nearest embedding neighbours",
        ["token", "neighbours (cosine)"],
        [
            [t, " | ".join(f"{n} ({s:.2f})" for n, s in zip(nbs, f["neighbour_similarity"][t]))]
            for t, nbs in f["neighbours"].items()
        ],
    )
