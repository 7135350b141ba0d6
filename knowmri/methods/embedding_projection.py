"""Embedding projection (Dar et al. 2022, "Analyzing Transformers in Embedding Space"): read hidden states
and parameters in the vocabulary by multiplying them with the embedding matrices, with no training.

Four views of one prompt: (1) the residual stream of every layer at the prediction position, projected by
the unembedding directly (the paper) or through the final norm (the logit lens); (2) the value vectors of
the MLP neurons that write most at that position (|activation| x ||value vector||), signed by their
activation, read as tokens; (3) the OV circuits W_V W_O of the heads that write most there, applied to the
prompt's token embeddings and read through the unembedding (which token each head would write when it
attends to a token); (4) the nearest neighbours of the prompt's tokens in the input embedding space, with a
PCA map of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from knowmri.methods.base import Estimate, Method, MethodResult, Params, RunContext, register_method
from knowmri.methods.common import clean_pass, prepare
from knowmri.methods.weight_cache import row_norms as weight_row_norms
from knowmri.methods.weight_cache import weight_derived
from knowmri.report import figures
from knowmri.sample import Sample


@dataclass
class EmbeddingProjectionParams(Params):
    top_k: int = field(default=5, metadata={"help": "vocabulary tokens listed per vector"})
    position: int = field(
        default=-1,
        metadata={"help": "input position read (residual stream, neurons, heads): -1 = the one predicting the answer"},
    )
    final_norm: bool = field(
        default=False,
        metadata={
            "help": "apply the final norm before the unembedding (the logit lens); "
            "default: project directly (the paper)"
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

    def check(self, model: Any, sample: Sample) -> list[str]:
        return [] if model.spec.qkv else [f"{model.architecture} has no q/k/v map (archs.toml `qkv`)"]

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """The clean pass (with heads); the value-vector and embedding norms (once per process); the
        vectors read in the vocabulary (every layer's residual, the top neurons, the chosen heads' OV
        circuit per prompt token, the prompt tokens' embeddings) projected in chunks of
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
        rows = dims.layers + p.top_neurons + heads * unique + unique
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
        enc, pos, tok = prep.enc, prep.enc.pred_pos, model.tokenizer
        if params.position != -1:
            length = enc.read_ids.shape[1]
            if not -length <= params.position < length:
                raise ValueError(f"position {params.position} is out of range for {length} tokens")
            pos = params.position % length
        n_layers = model.n_layers
        clean = clean_pass(model, enc, ctx, positions=[pos], heads=True)  # shared with the other light methods
        row = clean.rows([pos])[0]
        resid = clean.resid[:, pos]  # [L, d_model]
        neurons = clean.neurons[:, row]  # [L, d_mlp]
        heads = clean.heads[:, row]  # [L, H, d_head]
        unembed = model.unembedding  # [V, d], in the model's dtype (no float32 copy of a large vocabulary)
        emb = model.embed_module.weight

        def project(vectors: torch.Tensor) -> torch.Tensor:
            vectors = vectors.to(device=unembed.device, dtype=unembed.dtype)
            if params.final_norm:
                return model.readout(vectors).float()
            return (vectors @ unembed.T).float()

        def inner(vectors: torch.Tensor) -> torch.Tensor:  # dot products with every input embedding
            return (vectors @ emb.T).float()

        decoded: dict[int, str] = {}

        def name(i: int) -> str:
            if i not in decoded:
                decoded[i] = tok.decode([i])
            return decoded[i]

        def names(ids: torch.Tensor) -> list[str]:
            return [name(i) for i in ids.tolist()]

        k = min(params.top_k, model.vocab_size)
        target = enc.target_ids[0]
        answer = tok.decode([target])

        # What is read in the vocabulary (projected together below, in a few large products):
        # (1) the residual stream of every layer at the position
        ctx.progress(0.2, "MLP neurons")
        # (2) the MLP neurons that write most at the position: |a| x ||v||, read as sign(a) * v
        picked: list[tuple[int, int]] = []
        vectors = resid[:0]
        if params.top_neurons:
            acts = neurons.float().to(unembed.device)  # [L, d_mlp]
            values = [model.mlp_value_vectors(layer) for layer in range(n_layers)]
            norms = torch.stack([value_norms(model, layer).to(unembed.device) for layer in range(n_layers)])
            score = acts.abs() * norms
            top = score.flatten().topk(min(params.top_neurons, score.numel())).indices.tolist()
            picked = [(i // score.shape[1], i % score.shape[1]) for i in top]
            vectors = torch.stack(
                [values[layer][unit].to(unembed.device) * acts[layer, unit].sign() for layer, unit in picked]
            )

        ctx.progress(0.4, "attention heads")
        # (3) OV circuits of the heads that write most: what each would write for each prompt token
        prompt_ids = (
            enc.input_ids[0, : enc.prompt_len].tolist() if model.kind != "masked" else enc.input_ids[0].tolist()
        )
        special = set(tok.all_special_ids)
        unique_ids = list(dict.fromkeys(i for i in prompt_ids if i not in special)) or list(dict.fromkeys(prompt_ids))
        norms_per_layer = []
        for layer in range(n_layers):  # what each head writes at the position: z_h @ W_O[h]
            w_o = model.output_weights(layer)
            z = heads[layer].to(device=w_o.device, dtype=w_o.dtype)
            norms_per_layer.append((z[:, None, :] @ w_o).squeeze(1).float().norm(dim=-1).cpu())
        head_norms = torch.stack(norms_per_layer)  # [L, H]
        chosen = parse_heads(params.heads)
        for layer, head in chosen:
            if not (0 <= layer < n_layers and 0 <= head < model.n_heads):
                raise ValueError(
                    f"head {layer}.{head} does not exist: the model has {n_layers} layers of {model.n_heads} heads"
                )
        if not chosen and params.top_heads:
            order = head_norms.flatten().topk(min(params.top_heads, head_norms.numel())).indices
            chosen = [(int(i) // model.n_heads, int(i) % model.n_heads) for i in order]
        id_tensor = torch.tensor([unique_ids], device=model.device)
        embedded = model.embed_module(id_tensor)[0]  # the embedding as the residual stream receives it
        ovs = []
        for layer, head in chosen:
            w_v, w_o = model.ov_circuit(layer, head)
            ovs.append((embedded.to(device=w_v.device, dtype=w_v.dtype) @ w_v @ w_o).to(unembed.device))  # [n, d_model]

        # (4) nearest neighbours in the input embedding space (cosine)
        row_norms = embedding_norms(model).clamp_min(1e-12)
        query_ids = torch.tensor(unique_ids, device=emb.device)
        n_nb = min(params.n_neighbours, model.vocab_size - 1)

        def neighbours_of(dots: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
            q = query_ids[first: first + dots.shape[0]]
            sims = dots / (row_norms[q, None] * row_norms[None, :])
            sims[torch.arange(len(q), device=sims.device), q] = -2.0
            return sims.topk(n_nb, dim=-1)

        def top_ids(logits: torch.Tensor, first: int) -> tuple[torch.Tensor]:
            return (logits.topk(k, dim=-1).indices,)

        def cast(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=unembed.device, dtype=unembed.dtype)

        ctx.progress(0.6, "vocabulary projections")
        # With tied embeddings (and no final norm) the neighbours' dot products are the same product.
        neighbour_fn = project if emb is unembed and not params.final_norm else inner
        (logits,), (neuron_ids,), (ov_ids,), (nb_vals, nb_ids) = project_parts([
            (project, cast(resid), lambda x, first: (x,)),
            (project, cast(vectors), top_ids),
            (project, cast(torch.cat(ovs)) if ovs else cast(resid[:0]), top_ids),
            (neighbour_fn, emb[query_ids], neighbours_of),
        ], width=model.vocab_size)

        ctx.progress(0.8, "tables")
        target_score = logits[:, target]
        target_rank = ((logits > target_score[:, None]).sum(-1, dtype=torch.int32) + 1).tolist()
        layer_tokens = [names(row) for row in logits.topk(k, dim=-1).indices]
        final_top = logits[-1].topk(k).indices.tolist()
        shown = [target] + [i for i in final_top if i != target][: max(0, k - 1)]
        shown_scores = logits[:, torch.tensor(shown, device=logits.device)]  # [L, S]
        rank_grid = ((logits[:, None, :] > shown_scores[:, :, None]).sum(-1, dtype=torch.int32) + 1).tolist()
        neuron_rows: list[dict[str, Any]] = [
            {
                "layer": layer,
                "unit": unit,
                "score": float(score[layer, unit]),
                "activation": float(acts[layer, unit]),
                "tokens": names(row),
            }
            for (layer, unit), row in zip(picked, neuron_ids)
        ]
        head_rows = []
        n_ids = len(unique_ids)
        for j, (layer, head) in enumerate(chosen):
            rows = ov_ids[j * n_ids: (j + 1) * n_ids]
            copies = [{"token": name(t), "writes": names(row)} for t, row in zip(unique_ids, rows)]
            copying = float(np.mean([t in row.tolist() for t, row in zip(unique_ids, rows)]))
            head_rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "score": float(head_norms[layer, head]),
                    "copying": copying,
                    "copies": copies,
                }
            )
        neighbours = {name(t): names(row) for t, row in zip(unique_ids, nb_ids)}
        map_fig = _neighbour_map(emb, row_norms, unique_ids, nb_ids, tok, params.map_dims)

        result = self.new_result(params)
        first_top = next((i for i, r in enumerate(target_rank) if r == 1), None)
        result.findings = {
            "target": prep.answer,
            "target_token": answer,
            "answer_source": prep.answer_source,
            "position": pos,
            "final_norm": params.final_norm,
            "layer_tokens": layer_tokens,
            "target_rank": target_rank,
            "target_score": [float(s) for s in target_score],
            "first_top1_layer": first_top,
            "layer_scores": [{"layer": i, "score": 1.0 / r} for i, r in enumerate(target_rank)],
            "neurons": neuron_rows,
            "heads": head_rows,
            "neighbours": neighbours,
            "neighbour_similarity": {
                name(t): [round(v, 4) for v in row] for t, row in zip(unique_ids, nb_vals.tolist())
            },
        }
        how = "through the final norm" if params.final_norm else "directly by the unembedding"
        where = (
            f"it is the top token from layer {first_top} on"
            if first_top is not None
            else f"its best rank is {min(target_rank)} (layer {int(np.argmin(target_rank))})"
        )
        at = "the position predicting the answer" if pos == enc.pred_pos else f"position {pos}"
        parts = [
            f"Projected {how}, the residual stream at {at} ranks {answer!r} ({prep.answer_source}) "
            f"{target_rank[0]} after layer 0 and {target_rank[-1]} after the last layer; {where}."
        ]
        if neuron_rows:
            n0 = neuron_rows[0]
            parts.append(
                f"The neuron writing most there is L{n0['layer']}.{n0['unit']}, whose value vector promotes "
                f"{', '.join(map(repr, n0['tokens'][:3]))}."
            )
        if head_rows:
            best = max(head_rows, key=lambda r: r["copying"])
            parts.append(
                f"Of the heads read, {best['layer']}.{best['head']} copies the most prompt tokens "
                f"({best['copying']:.0%} map to themselves through W_V W_O)."
            )
        result.summary = " ".join(parts)

        layers = list(range(n_layers))
        result.add_figure(
            "Rank of the answer and the final top tokens by layer",
            figures.heatmap(
                [[float(np.log10(r)) for r in row] for row in rank_grid],
                x=[repr(tok.decode([i])) for i in shown],
                y=layers,
                text=[[str(r) for r in row] for row in rank_grid],
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
            ["layer", f"rank of {answer!r}", "top tokens"],
            [[i, target_rank[i], " | ".join(layer_tokens[i])] for i in layers],
        )
        result.add_table(
            "Most active MLP neurons",
            ["layer", "unit", "activation", "score", "tokens promoted"],
            [
                [r["layer"], r["unit"], round(r["activation"], 4), round(r["score"], 4), " | ".join(r["tokens"])]
                for r in neuron_rows
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
                for r in head_rows
            ],
        )
        result.add_table(
            "Nearest embedding neighbours",
            ["token", "neighbours (cosine)"],
            [
                [t, " | ".join(f"{n} ({s:.2f})" for n, s in zip(nbs, result.findings["neighbour_similarity"][t]))]
                for t, nbs in neighbours.items()
            ],
        )
        result.arrays["residual_logits_top"] = logits.topk(k, dim=-1).values.cpu().numpy()
        return result


PROJECT_CHUNK_BYTES = 1 << 27  # float32 scores of one batch of projected rows


def value_norms(model: Any, layer: int) -> torch.Tensor:
    """[d_mlp] float32 norms of one layer's MLP value vectors (computed once per weight)."""
    def norms(_: torch.Tensor) -> torch.Tensor:
        v = model.mlp_value_vectors(layer)  # [d_mlp, d_model], often a transposed view of [d_model, d_mlp]
        if v.stride(-1) == 1:
            return torch.linalg.vector_norm(v, dim=-1, dtype=torch.float32)
        return v.T.float().square().sum(0).sqrt()  # column sums: strided row norms are several times slower

    return weight_derived(model.component(layer, "mlp_down").weight, "value_norms", norms)  # the stored parameter


def embedding_norms(model: Any) -> torch.Tensor:
    """[vocab] float32 norms of the input embeddings (computed once per weight)."""
    return weight_row_norms(model.embed_module.weight)


def project_parts(parts: list[tuple[Any, torch.Tensor, Any]], width: int) -> list[tuple[torch.Tensor, ...]]:
    """For each (fn, rows [n, d], reduce): `reduce(fn(rows)[i:j], i)` over its rows, concatenated.

    Consecutive parts with the same `fn` are projected together, in batches of rows whose [rows,
    width] float32 output stays under PROJECT_CHUNK_BYTES: a few large products instead of many
    small ones (a [10, d] x [d, vocab] product is several times slower per row than a [300, d] one).
    """
    max_rows = max(1, PROJECT_CHUNK_BYTES // (4 * width))
    results: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in parts]
    i = 0
    while i < len(parts):
        fn = parts[i][0]
        j = i
        while j < len(parts) and parts[j][0] is fn:
            j += 1
        pieces = [(p, s, parts[p][1][s:s + max_rows]) for p in range(i, j)
                  for s in range(0, parts[p][1].shape[0], max_rows)]
        batch: list[tuple[int, int, torch.Tensor]] = []
        for piece in [*pieces, None]:
            if batch and (piece is None or sum(len(t) for _, _, t in batch) + len(piece[2]) > max_rows):
                out = fn(torch.cat([t for _, _, t in batch]))
                offset = 0
                for p, first, t in batch:
                    results[p].append(parts[p][2](out[offset:offset + len(t)], first))
                    offset += len(t)
                batch = []
            if piece is not None:
                batch.append(piece)
        i = j
    final = []
    for p, (_, rows, reduce) in enumerate(parts):
        if not results[p]:
            results[p].append(reduce(torch.zeros(0, width, device=rows.device), 0))
        final.append(tuple(torch.cat(items) for items in zip(*results[p])))
    return final


def pca_coords(centred: torch.Tensor, dims: int) -> np.ndarray:
    """[n, <= dims] principal coordinates of centred points (U S of their SVD), from the eigenvectors of the
    [n, n] Gram matrix: with a few dozen points in a wide embedding space that is a tenth of an SVD's cost.
    Each axis is signed so that its largest coordinate is positive (an SVD's signs are arbitrary too).
    In torch, not numpy: numpy's OpenBLAS threads keep spinning after a call, and on a small machine they
    take the cores from the next forward pass (tens of milliseconds on 2 cores)."""
    values, vectors = torch.linalg.eigh(centred @ centred.T)  # ascending
    top = values.argsort(descending=True)[:dims]
    coords = vectors[:, top] * values[top].clamp_min(0.0).sqrt()
    flip = coords.gather(0, coords.abs().argmax(0, keepdim=True)).sign()
    return (coords * torch.where(flip == 0, 1.0, flip)).cpu().numpy()


def _neighbour_map(
    emb: torch.Tensor, row_norms: torch.Tensor, ids: list[int], nb_ids: torch.Tensor, tok: Any, dims: int
) -> Any:
    """A PCA scatter of the prompt's tokens and their nearest neighbours."""
    groups = {t: [t] + [int(i) for i in row] for t, row in zip(ids, nb_ids.tolist())}
    order = list(dict.fromkeys(i for members in groups.values() for i in members))
    index_t = torch.tensor(order, device=emb.device)
    points = (emb[index_t].double() / row_norms[index_t, None].double()).cpu()  # unit vectors
    coords = pca_coords(points - points.mean(0, keepdim=True), dims)
    if coords.shape[1] < dims:
        coords = np.pad(coords, ((0, 0), (0, dims - coords.shape[1])))
    index = {i: n for n, i in enumerate(order)}
    decoded = {i: tok.decode([i]) for i in order}
    traces = []
    for t, members in groups.items():
        rows = [index[i] for i in members]
        trace: dict[str, Any] = {
            "marker": {"size": [14] + [8] * (len(members) - 1)},
            "mode": "markers+text",
            "name": repr(decoded[t]),
            "text": [decoded[i] for i in members],
            "textposition": "top center",
            "x": coords[rows, 0].tolist(),
            "y": coords[rows, 1].tolist(),
        }
        if dims == 3:
            trace["z"] = coords[rows, 2].tolist()
        trace["type"] = "scatter3d" if dims == 3 else "scatter"
        traces.append(trace)
    return figures.figure(
        traces,
        title="Prompt tokens (large) and their nearest neighbours in the input embedding space (PCA)",
        x_title="PC 1",
        y_title="PC 2",
        legend={"title": {"text": "token"}},
    )
