"""Embedding projection's engine (`embedding_projection` runs it): vectors read in the vocabulary in a few
large products.

`top_neurons` picks the MLP neurons that write most at a position (|activation| x ||value vector||, the
norms from `value_norms`, once per weight), `head_output_norms` and `ov_outputs` what the heads write
there and what their OV circuits write for each prompt token; `VocabularyReader` reads all of them
through the final norm and the unembedding (as the model reads its last layer) or the unembedding alone,
reads the residual stream the other way too (shown beside it), and finds the prompt tokens' nearest
neighbours among the input embeddings (`embedding_norms`), batching the products with `project_parts`;
`pca_coords` and `neighbour_map` map the neighbours. `RankTables` holds the answer's rank in every
layer's reading, `head_table` what each chosen head writes, `TokenNames` decodes each token once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from knowmri import neuron_units
from knowmri.methods.weight_cache import row_norms as weight_row_norms
from knowmri.methods.weight_cache import weight_derived
from knowmri.models.model import Encoded
from knowmri.report import figures

PROJECT_CHUNK_BYTES = 1 << 27  # float32 scores of one batch of projected rows


def value_norms(model: Any, layer: int) -> torch.Tensor:
    """[units] float32 norms of one layer's MLP value vectors, or of its experts' side by side
    (`knowmri.neuron_units`), computed once per weight."""
    if neuron_units.is_moe(model, layer):
        experts = model.component(layer, "moe_experts")
        return weight_derived(experts.down_proj, "value_norms", lambda down: torch.linalg.vector_norm(
            down.float(), dim=1).flatten())  # down_proj [E, d_model, d_expert]: column norms, expert by expert

    def norms(_: torch.Tensor) -> torch.Tensor:
        v = model.mlp_value_vectors(layer)  # [d_mlp, d_model], often a transposed view of [d_model, d_mlp]
        if v.stride(-1) == 1:
            return torch.linalg.vector_norm(v, dim=-1, dtype=torch.float32)
        return v.T.float().square().sum(0).sqrt()  # column sums: strided row norms are several times slower

    return weight_derived(model.component(layer, "mlp_down").weight, "value_norms", norms)  # the stored parameter


def embedding_norms(model: Any) -> torch.Tensor:
    """[vocab] float32 norms of the input embeddings (computed once per weight)."""
    return weight_row_norms(model.embed_module.weight)


@dataclass
class TopNeurons:
    """The MLP neurons that write most at the position (|activation| x ||value vector||): (layer, unit, score,
    activation) each, and their value vectors signed by their activation ([n, d_model], the unembedding's device)."""

    picked: list[tuple[int, int, float, float]]
    vectors: torch.Tensor


def top_neurons(model: Any, neurons: torch.Tensor, n: int) -> TopNeurons:
    """The `n` neurons of `neurons` ([L, d_mlp] activations at the position) that write most there."""
    unembed = model.unembedding
    if not n:
        return TopNeurons([], torch.zeros(0, model.d_model, dtype=neurons.dtype, device=neurons.device))
    acts = neurons.float().to(unembed.device)  # [L, d_mlp]
    width = acts.shape[1]
    norms = torch.zeros(model.n_layers, width, device=unembed.device)
    for layer in range(model.n_layers):
        row = value_norms(model, layer).to(unembed.device)
        norms[layer, : row.shape[0]] = row
    score = acts.abs() * norms
    top = score.flatten().topk(min(n, score.numel())).indices.tolist()
    picked = [(i // score.shape[1], i % score.shape[1]) for i in top]
    vectors = torch.stack([neuron_units.value_vectors(model, layer, [unit])[0].to(unembed.device) * acts[layer, unit].sign()
                           for layer, unit in picked])
    return TopNeurons([(layer, unit, float(score[layer, unit]), float(acts[layer, unit])) for layer, unit in picked],
                      vectors)


def head_output_norms(model: Any, heads: torch.Tensor) -> torch.Tensor:
    """[L, H]: the norm of what each head writes at the position, z_h @ W_O[h], from `heads` [L, H, d_head]."""
    norms_per_layer = []
    for layer in range(model.n_layers):
        w_o = model.output_weights(layer)
        z = heads[layer].to(device=w_o.device, dtype=w_o.dtype)
        norms_per_layer.append((z[:, None, :] @ w_o).squeeze(1).float().norm(dim=-1).cpu())
    return torch.stack(norms_per_layer)


def ov_outputs(model: Any, chosen: list[tuple[int, int]], token_ids: list[int]) -> list[torch.Tensor]:
    """Per chosen head, what its OV circuit writes for each token ([n, d_model], the unembedding's device): the
    token's embedding, as the residual stream receives it, through W_V W_O."""
    unembed = model.unembedding
    embedded = model.embed_module(torch.tensor([token_ids], device=model.device))[0]
    ovs = []
    for layer, head in chosen:
        w_v, w_o = model.ov_circuit(layer, head)
        ovs.append((embedded.to(device=w_v.device, dtype=w_v.dtype) @ w_v @ w_o).to(unembed.device))
    return ovs


@dataclass
class VocabularyRead:
    """What `VocabularyReader.read` found: every layer's logits [L, vocab], the same read the other way
    (`other_logits`, through the final norm when `logits` is not and vice versa; None when the model has no
    final norm), the top token ids of the neurons' and the OV outputs' rows, and the prompt tokens' nearest
    neighbours (cosine similarities and ids)."""

    logits: torch.Tensor
    other_logits: torch.Tensor | None
    neuron_ids: torch.Tensor
    ov_ids: torch.Tensor
    neighbour_sims: torch.Tensor
    neighbour_ids: torch.Tensor


class VocabularyReader:
    """Reads vectors in the vocabulary through the final norm and the unembedding (`final_norm`, the logit lens:
    how the model reads its last layer) or through the unembedding alone (the raw projection), the residual
    stream both ways where the model has a final norm, and the prompt tokens' nearest neighbours in the input
    embedding space; all in a few large products (`project_parts`). Vectors stay in the model's dtype (no
    float32 copy of a large vocabulary)."""

    def __init__(self, model: Any, token_ids: list[int], *, final_norm: bool, top_k: int, n_neighbours: int) -> None:
        self.model = model
        self.both = model.final_norm is not None  # without a final norm the two readings are one
        self.final_norm = final_norm and self.both
        self.unembed = model.unembedding  # [V, d]
        self.emb = model.embed_module.weight
        self.k = min(top_k, model.vocab_size)
        self.row_norms = embedding_norms(model).clamp_min(1e-12)
        self.query_ids = torch.tensor(token_ids, device=self.emb.device)
        self.n_neighbours = min(n_neighbours, model.vocab_size - 1)

    def normed(self, vectors: torch.Tensor) -> torch.Tensor:
        """Logits through the final norm (and the model's own read-out scaling), as the model reads its output."""
        return self.model.readout(vectors.to(device=self.unembed.device, dtype=self.unembed.dtype)).float()

    def direct(self, vectors: torch.Tensor) -> torch.Tensor:
        """Logits by the unembedding alone (no final norm)."""
        return (vectors.to(device=self.unembed.device, dtype=self.unembed.dtype) @ self.unembed.T).float()

    def inner(self, vectors: torch.Tensor) -> torch.Tensor:
        """Dot products with every input embedding."""
        return (vectors @ self.emb.T).float()

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.unembed.device, dtype=self.unembed.dtype)

    @staticmethod
    def whole(logits: torch.Tensor, first: int) -> tuple[torch.Tensor]:
        return (logits,)

    def top_ids(self, logits: torch.Tensor, first: int) -> tuple[torch.Tensor]:
        return (logits.topk(self.k, dim=-1).indices,)

    def neighbours(self, dots: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarities and ids of the nearest neighbours of query tokens first.. (themselves left out)."""
        q = self.query_ids[first: first + dots.shape[0]]
        sims = dots / (self.row_norms[q, None] * self.row_norms[None, :])
        sims[torch.arange(len(q), device=sims.device), q] = -2.0
        return sims.topk(self.n_neighbours, dim=-1)

    def read(self, resid: torch.Tensor, neurons: torch.Tensor, ovs: list[torch.Tensor]) -> VocabularyRead:
        """Residual states [L, d], neuron vectors [n, d] and OV outputs in the vocabulary; the neighbours."""
        # One bound method per function: `project_parts` batches consecutive parts that share one. With tied
        # embeddings the raw projection and the neighbours' dot products are the same product.
        direct, normed = self.direct, self.normed
        project, other = (normed, direct) if self.final_norm else (direct, normed)
        neighbour_fn = direct if self.emb is self.unembed else self.inner
        parts = {
            "resid": (project, self.cast(resid), self.whole),
            "neurons": (project, self.cast(neurons), self.top_ids),
            "ovs": (project, self.cast(torch.cat(ovs)) if ovs else self.cast(resid[:0]), self.top_ids),
            "other": (other, self.cast(resid if self.both else resid[:0]), self.whole),
            "neighbours": (neighbour_fn, self.emb[self.query_ids], self.neighbours),
        }
        order = sorted(parts, key=lambda name: parts[name][0] is not project)  # parts sharing a function together
        out = dict(zip(order, project_parts([parts[name] for name in order], width=self.model.vocab_size)))
        return VocabularyRead(out["resid"][0], out["other"][0] if self.both else None, out["neurons"][0],
                              out["ovs"][0], *out["neighbours"])


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


class TokenNames:
    """Token texts, each id decoded once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.decoded: dict[int, str] = {}

    def one(self, i: int) -> str:
        if i not in self.decoded:
            self.decoded[i] = self.tokenizer.decode([i])
        return self.decoded[i]

    def __call__(self, ids: torch.Tensor) -> list[str]:
        return [self.one(i) for i in ids.tolist()]


def prompt_token_ids(model: Any, enc: Encoded) -> list[int]:
    """The prompt's distinct tokens, in order, special tokens left out (unless there is nothing else)."""
    ids = enc.input_ids[0, : enc.prompt_len].tolist() if model.kind != "masked" else enc.input_ids[0].tolist()
    special = set(model.tokenizer.all_special_ids)
    return list(dict.fromkeys(i for i in ids if i not in special)) or list(dict.fromkeys(ids))


def answer_ranks(logits: torch.Tensor, target: int) -> list[int]:
    """The rank (1 = top) of token `target` in each row of `logits` [L, vocab]."""
    return ((logits > logits[:, target][:, None]).sum(-1, dtype=torch.int32) + 1).tolist()


@dataclass
class RankTables:
    """The answer's rank and score in every layer's projection, each layer's top tokens, and the rank of the
    answer and the final layer's top tokens in every layer (`rank_grid` [L, len(shown)])."""

    target: int
    target_rank: list[int]
    target_score: list[float]
    layer_top: torch.Tensor
    first_top: int | None
    shown: list[int]
    rank_grid: list[list[int]]

    @classmethod
    def of(cls, logits: torch.Tensor, target: int, k: int) -> RankTables:
        target_score = logits[:, target]
        target_rank = answer_ranks(logits, target)
        layer_top = logits.topk(k, dim=-1).indices
        final_top = logits[-1].topk(k).indices.tolist()
        shown = [target] + [i for i in final_top if i != target][: max(0, k - 1)]
        shown_scores = logits[:, torch.tensor(shown, device=logits.device)]  # [L, S]
        rank_grid = ((logits[:, None, :] > shown_scores[:, :, None]).sum(-1, dtype=torch.int32) + 1).tolist()
        first_top = next((i for i, r in enumerate(target_rank) if r == 1), None)
        return cls(target, target_rank, [float(s) for s in target_score], layer_top, first_top, shown, rank_grid)


def head_table(chosen: list[tuple[int, int]], head_norms: torch.Tensor, token_ids: list[int], ov_ids: torch.Tensor,
               names: TokenNames) -> list[dict[str, Any]]:
    """Per chosen head: its output norm, which token it writes for each prompt token, and how many map to themselves."""
    head_rows = []
    n_ids = len(token_ids)
    for j, (layer, head) in enumerate(chosen):
        rows = ov_ids[j * n_ids: (j + 1) * n_ids]
        copies = [{"token": names.one(t), "writes": names(row)} for t, row in zip(token_ids, rows)]
        copying = float(np.mean([t in row.tolist() for t, row in zip(token_ids, rows)]))
        head_rows.append(
            {
                "layer": layer,
                "head": head,
                "score": float(head_norms[layer, head]),
                "copying": copying,
                "copies": copies,
            }
        )
    return head_rows


def neighbour_map(
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
