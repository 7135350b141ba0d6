"""Circuits sized by faithfulness (`knowledge_circuits` runs it): the smallest circuit, of the edges
ranked once by their attribution score, whose own run recovers a target share of the metric.

Hanna et al. 2024 ("Have Faith in Faithfulness: Going Beyond Circuit Overlap When Finding Model
Mechanisms") show that a circuit found by edge attribution is only worth its faithfulness, and
that faithfulness depends on the circuit's size: they report the curve of faithfulness over the
number of edges kept and the smallest circuit reaching a target. This module does that:

- a circuit of size n is the n edges of largest |score| (above an optional threshold), pruned to
  the edges on some path from `input` to `logits` (`circuit_mask`, matrix reachability);
- its faithfulness is measured by node-level patching: every head and MLP outside the circuit
  outputs its activation from the corrupted run (`patched_metrics`), and `recovered` is
  (metric(circuit) - metric(corrupted)) / (metric(clean) - metric(corrupted));
- `search` evaluates log-spaced sizes, several circuits per forward pass (one batch row each),
  then refines between the largest failing size and the smallest passing one with more log-spaced
  sizes in one more pass, until the two are consecutive or within `resolution` of each other.
  Sizes whose circuit has the same nodes as one already measured are not run again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from knowmri.hooks import Hooks, site
from knowmri.methods.circuits_engine import Graph, answer_metric, forward_logits


def ranked_edges(graph: Graph, threshold: float = 0.0) -> torch.Tensor:
    """Flat indices into `graph.scores` of the existing edges with |score| >= threshold, largest |score| first."""
    magnitude = graph.scores.abs().flatten()
    ok = graph.valid.flatten() & (magnitude >= threshold)
    idx = ok.nonzero().flatten()
    return idx[magnitude[idx].argsort(descending=True, stable=True)]


def circuit_mask(graph: Graph, edges: torch.Tensor) -> torch.Tensor:
    """[upstream, downstream] bool: of the edges `edges` (flat indices), those on a path from `input` to `logits`.

    Node k of the downstream list is node k + 1 of the upstream list (`node_names`), so reachability
    runs on one square adjacency matrix over input, the heads and MLPs in layer order, and logits.
    """
    n_up, n_down = graph.scores.shape
    kept = torch.zeros(n_up * n_down, dtype=torch.bool)
    kept[edges] = True
    kept = kept.view(n_up, n_down)
    adj = torch.zeros(n_up + 1, n_up + 1)
    adj[:n_up, 1:] = kept.float()
    forward = torch.zeros(n_up + 1, dtype=torch.bool)
    forward[0] = True
    backward = torch.zeros(n_up + 1, dtype=torch.bool)
    backward[-1] = True
    for _ in range(n_up + 1):
        f = forward | ((forward.float() @ adj) > 0)
        b = backward | ((adj @ backward.float()) > 0)
        if torch.equal(f, forward) and torch.equal(b, backward):
            break
        forward, backward = f, b
    return kept & forward[:n_up, None] & backward[None, 1:]


def edge_list(graph: Graph, mask: torch.Tensor) -> list[tuple[str, str, float]]:
    """The edges of `mask` as (src, dst, score), largest |score| first."""
    up, down = mask.nonzero(as_tuple=True)
    scores = graph.scores[up, down]
    order = scores.abs().argsort(descending=True, stable=True).tolist()
    return [(graph.upstream[int(up[i])], graph.downstream[int(down[i])], float(scores[i])) for i in order]


def node_masks(mask: torch.Tensor, n_layers: int, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which heads [layers, heads] and MLPs [layers] have an edge in the circuit `mask`."""
    present = torch.zeros(mask.shape[0] + 1, dtype=torch.bool)
    present[: mask.shape[0]] |= mask.any(1)
    present[1:] |= mask.any(0)
    per_layer = present[1: 1 + n_layers * (n_heads + 1)].view(n_layers, n_heads + 1)
    return per_layer[:, :n_heads], per_layer[:, n_heads]


@torch.no_grad()
def patched_metrics(model: Any, clean_ids: torch.Tensor, heads: torch.Tensor, mlps: torch.Tensor,
                    corrupted: dict[str, torch.Tensor], answer: int, wrong: int, metric: str,
                    max_tokens: int = 4096) -> list[float]:
    """The metric of each circuit (row i: heads [i, layers, heads] and MLPs [i, layers] kept) when every
    head and MLP outside it outputs its corrupted activation; several circuits per forward pass."""
    n, length = heads.shape[0], clean_ids.shape[1]
    rows = max(1, min(n, max_tokens // max(length, 1)))
    out: list[float] = []
    for first in range(0, n, rows):
        keep_h, keep_m = heads[first: first + rows], mlps[first: first + rows]
        with Hooks(model) as h:
            for layer in range(model.n_layers):
                if not bool(keep_h[:, layer].all()):
                    h.edit(site(layer, "attn.heads"), _patch(keep_h[:, layer][:, None, :, None],
                                                             corrupted[site(layer, "attn.heads")]))
                if not bool(keep_m[:, layer].all()):
                    h.edit(site(layer, "mlp.out"), _patch(keep_m[:, layer][:, None, None],
                                                          corrupted[site(layer, "mlp.out")]))
            ids = clean_ids.to(model.device).expand(keep_h.shape[0], -1)
            out += [float(v) for v in answer_metric(forward_logits(model, ids), answer, wrong, metric)]
    return out


def _patch(keep: torch.Tensor, corrupted: torch.Tensor) -> Any:
    """An edit that keeps the entries of `keep` (per row) and sets the others to `corrupted` [T, ...]."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep.to(x.device), x, corrupted.to(device=x.device, dtype=x.dtype)[None])

    return fn


@dataclass
class Point:
    """One measured circuit size: the top `size` edges, the edges and nodes left after pruning, its metric."""

    size: int
    edges: int
    nodes: int
    metric: float | None  # None: no edge on a path from the input to the logits
    recovered: float | None


@dataclass
class Search:
    """The sizes measured (in size order), the chosen one and the target it was chosen for."""

    points: list[Point]
    chosen: Point
    target: float
    passes: int
    mask: torch.Tensor = field(repr=False)

    def curve(self) -> list[dict[str, Any]]:
        return [{"edges": p.size, "recovered": p.recovered, "circuit_edges": p.edges, "nodes": p.nodes}
                for p in self.points if p.recovered is not None]


class Evaluator:
    """Measures circuits of given sizes (top-n edges of `order`), batching the patched passes and
    reusing the result of a node set already measured."""

    def __init__(self, model: Any, graph: Graph, order: torch.Tensor, clean_ids: torch.Tensor,
                 answer: int, wrong: int, metric: str) -> None:
        self.model, self.graph, self.order, self.clean_ids = model, graph, order, clean_ids
        self.answer, self.wrong, self.metric = answer, wrong, metric
        self.corrupted_metric, self.clean_metric = graph.metric[0], graph.metric[-1]
        self.points: dict[int, Point] = {}
        self.masks: dict[int, torch.Tensor] = {}
        self.by_nodes: dict[bytes, float] = {}
        self.passes = 0

    def recovered(self, value: float) -> float | None:
        span = self.clean_metric - self.corrupted_metric
        return (value - self.corrupted_metric) / span if span else None

    def measure(self, sizes: list[int]) -> None:
        """Measure every size not measured yet (the new node sets in one batched pass)."""
        todo: list[tuple[int, torch.Tensor, torch.Tensor, bytes, int]] = []
        for size in sorted(set(sizes) - set(self.points)):
            mask = circuit_mask(self.graph, self.order[:size])
            self.masks[size] = mask
            heads, mlps = node_masks(mask, self.model.n_layers, self.model.n_heads)
            n_nodes = int(heads.sum() + mlps.sum())
            if not bool(mask.any()):
                self.points[size] = Point(size, 0, 0, None, None)
                continue
            key = torch.cat([heads.flatten(), mlps]).numpy().tobytes()
            if bool(heads.all()) and bool(mlps.all()):  # nothing patched: the clean run
                self.by_nodes[key] = self.clean_metric
            todo.append((size, heads, mlps, key, n_nodes))
        new = {}
        for _, heads, mlps, key, _ in todo:
            if key not in self.by_nodes and key not in new:
                new[key] = (heads, mlps)
        if new:
            values = patched_metrics(self.model, self.clean_ids, torch.stack([h for h, _ in new.values()]),
                                     torch.stack([m for _, m in new.values()]), self.graph.corrupted_acts,
                                     self.answer, self.wrong, self.metric)
            self.passes += 1
            self.by_nodes.update(zip(new, values))
        for size, _, _, key, n_nodes in todo:
            value = self.by_nodes[key]
            self.points[size] = Point(size, int(self.masks[size].sum()), n_nodes, value, self.recovered(value))


def log_sizes(low: int, high: int, count: int) -> list[int]:
    """Up to `count` distinct integers log-spaced from `low` to `high` (both included when count >= 2)."""
    if high <= low or count < 2:
        return [high]
    step = (math.log(high) - math.log(low)) / (count - 1)
    return sorted({min(high, max(low, round(math.exp(math.log(low) + k * step)))) for k in range(count)})


def search(evaluator: Evaluator, target: float, *, per_pass: int = 16, refine: int = 8, resolution: float = 0.1,
           max_passes: int = 4, size: int | None = None) -> Search:
    """The smallest measured circuit reaching `target` (recovered share of the metric), after one pass
    over `per_pass` log-spaced sizes and passes of `refine` sizes between the largest failing and the
    smallest passing size, until they are consecutive or within `resolution` (relative) of each other.
    With `size`, that circuit is chosen and the coarse curve measured beside it (one pass).

    Where no size reaches the target, the most faithful one is chosen."""
    n = len(evaluator.order)
    if n == 0:
        raise ValueError("no edge to choose from: every edge score is below the threshold")
    coarse = log_sizes(1, n, per_pass if size is None else per_pass - 1)
    evaluator.measure(coarse + ([min(size, n)] if size is not None else []))
    if size is None:
        for _ in range(max_passes - 1):
            passing = [p.size for p in _measured(evaluator) if p.recovered >= target]
            if not passing:
                break
            hi = min(passing)
            lo = max((s for s in evaluator.points if s < hi), default=0)
            if hi - lo <= 1 or (lo and hi / lo <= 1 + resolution):
                break
            evaluator.measure([s for s in log_sizes(lo + 1, hi - 1, refine) if s not in evaluator.points])
    points = [evaluator.points[s] for s in sorted(evaluator.points)]
    measured = _measured(evaluator)
    if size is not None:
        chosen = evaluator.points[min(size, n)]
    else:
        passing = [p for p in measured if p.recovered >= target]
        chosen = passing[0] if passing else max(measured, key=lambda p: p.recovered, default=points[-1])
    return Search(points, chosen, target, evaluator.passes, evaluator.masks[chosen.size])


def _measured(evaluator: Evaluator) -> list[Point]:
    return [evaluator.points[s] for s in sorted(evaluator.points) if evaluator.points[s].recovered is not None]
