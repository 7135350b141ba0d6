"""Capability localisation over a dataset (Huang et al. 2025, arXiv 2502.20992, "Capability Localization").

Per sample s and MLP neuron (l, u), the contribution is activation times gradient of the
answer's mean per-token log-likelihood, summed over the answer-predicting positions P_s:

    c_s[l, u] = sum_{t in P_s} a_s[t, l, u] * d(mean_i log p(y_i | x, y_<i)) / d a_s[t, l, u]

(the first-order estimate of how much the answer's log-likelihood drops when the neuron is
removed). Over the n samples, neurons are ranked by `aggregate`: `mean_abs` (default,
S = 1/n sum_s |c_s|), `mean` (signed, S = 1/n sum_s c_s: neurons that support the answer) or
`frequency` (the fraction of samples whose own top `sample_top_fraction` of neurons by |c_s|
holds the neuron: the paper's "commonality" reading; ties broken by mean_abs).

Samples stream in batches; sums accumulate in place as int64 fixed point (units of 2^-32),
so the sum is exact and independent of order: a run split over processes (`accelerate
launch`) reduces its sums once with one all-reduce and equals a single process bit for bit.
Stability: the samples are dealt (seeded) into `subsets` disjoint subsets; each subset's
sums are also kept per stability checkpoint (5, 10, 20, ... samples per subset), and the
top-k sets of the subsets are compared at each checkpoint (overlap |A∩B|/k and IoU).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knowmri import neuron_units
from knowmri.hooks import Hooks
from knowmri.localize._core import as_samples, batches, check_answers, collate, progress_bar, teacher_forced
from knowmri.parallel import processes

_HI, _LO = 2.0 ** 24, 2.0 ** 32  # two int64 limbs: units of 2^-24 and of 2^-56
_BOUND = 2 ** 38  # the largest sum of |contributions| the limbs hold exactly
AGGREGATES = ("mean_abs", "mean", "frequency")
_DESCRIBE = {"mean_abs": "mean |activation x gradient|", "mean": "mean signed activation x gradient",
             "frequency": "frequency among each sample's top neurons"}


@dataclass
class Localization:
    """Where a capability lives: the located neurons, their stability, and the per-neuron scores."""

    neurons: list[dict[str, Any]]
    stability: list[dict[str, Any]]
    layer_distribution: list[dict[str, Any]]
    params: dict[str, Any]
    model: dict[str, Any]
    dataset: dict[str, Any]
    summary: str = ""
    seconds: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # mean_abs, mean, frequency: [n_layers, d_mlp]

    def to_dict(self) -> dict[str, Any]:
        from knowmri.report.report import knowmri_version
        from knowmri.report.result import jsonable

        return jsonable({
            "knowmri_version": knowmri_version(), "kind": "localization", "model": self.model, "dataset": self.dataset,
            "params": self.params, "summary": self.summary, "seconds": self.seconds, "neurons": self.neurons,
            "stability": self.stability, "layer_distribution": self.layer_distribution, "provenance": self.provenance,
        })

    def top(self, k: int) -> list[dict[str, Any]]:
        """The best `k` neurons by this run's aggregate (re-ranked from the stored scores)."""
        if not self.scores:
            return self.neurons[:k]
        order = _rank(self.scores, self.params["aggregate"])[:_positive(k, "k")]
        return _rows(order, self.scores, self.params["aggregate"], self.params.get("experts"))

    def figures(self) -> list[tuple[str, Any]]:
        from knowmri.report import figures

        out = []
        if self.stability:
            xs = [s["samples"] for s in self.stability]
            out.append(("Stability of the located neurons", figures.lines(
                xs, {"overlap |A∩B|/k": [s["overlap"] for s in self.stability], "IoU": [s["iou"] for s in self.stability]},
                title="Agreement between disjoint subsets", x_title="samples per subset", y_title="agreement")))
        dist = self.layer_distribution
        out.append(("Located neurons per layer", figures.bars(
            [d["layer"] for d in dist], [d["count"] for d in dist], title="Located neurons per layer",
            x_title="layer", y_title="neurons")))
        if self.scores:
            agg = self.params["aggregate"]
            out.append(("Score mass per layer", figures.bars(
                [d["layer"] for d in dist], [d["score_share"] for d in dist], title=f"Share of the total {agg} score",
                x_title="layer", y_title="share")))
        return out

    def tables(self) -> list[dict[str, Any]]:
        cols = ["rank", "layer", "unit", "score", "mean_abs", "mean", "frequency"]
        rows = [[i + 1, n["layer"], n["unit"] if "expert" not in n else f"E{n['expert']}.U{n['unit']}", n["score"], n.get("mean_abs"), n.get("mean"), n.get("frequency")]
                for i, n in enumerate(self.neurons)]
        tables = [{"name": "Located neurons (best first)", "columns": cols, "rows": rows}]
        if self.stability:
            tables.append({"name": "Stability", "columns": ["samples per subset", "overlap", "iou"],
                           "rows": [[s["samples"], s["overlap"], s["iou"]] for s in self.stability]})
        tables.append({"name": "Layer distribution", "columns": ["layer", "count", "score_share"],
                       "rows": [[d["layer"], d["count"], d["score_share"]] for d in self.layer_distribution]})
        return tables

    def save(self, directory: str | Path) -> Path:
        """Write localization.json, index.html (interactive figures) and scores.npz to `directory`."""
        from knowmri.localize._page import write_page

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        (out / "localization.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        if self.scores:
            np.savez_compressed(out / "scores.npz", **self.scores)
        write_page(out / "index.html", "Capability localisation", data, self.figures(), self.tables())
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Localization:
        """Reopen a saved localisation (its directory or its localization.json)."""
        from knowmri.report.report import read_saved_json

        file, data = read_saved_json(directory, "localization.json")
        if "neurons" not in data:
            raise ValueError(f"{file} is not a knowmri localisation: it has no 'neurons'")
        scores = {}
        if (file.parent / "scores.npz").is_file():
            with np.load(file.parent / "scores.npz", allow_pickle=False) as z:
                scores = {k: z[k] for k in z.files}
        return cls(neurons=data["neurons"], stability=data.get("stability", []),
                   layer_distribution=data.get("layer_distribution", []), params=data.get("params", {}),
                   model=data.get("model", {}), dataset=data.get("dataset", {}), summary=data.get("summary", ""),
                   seconds=data.get("seconds", 0.0), provenance=data.get("provenance", {}), scores=scores)

    def _repr_html_(self) -> str:
        """The localisation drawn inline in a notebook, as its index.html draws it."""
        from knowmri.localize._page import notebook_output

        return notebook_output("Capability localisation", self.to_dict(), self.figures(), self.tables())

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/html": self._repr_html_(), "text/plain": self.summary or f"Localization of {len(self.neurons)} neurons"}

    def neurons_frame(self) -> Any:
        """The located neurons as a tidy DataFrame, best first: `rank`, `layer`, `unit`, `score` (the run's
        aggregate), `mean_abs`, `mean`, `frequency` (needs pandas)."""
        from knowmri.report.frames import frame

        return frame([{"rank": i + 1, **n} for i, n in enumerate(self.neurons)], ("rank", "layer", "unit", "score"))


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def stability_counts(per_subset: int, counts: list[int] | None = None) -> list[int]:
    """The checkpoints (samples per subset): 5, 10, 20, ... doubling, and the whole subset."""
    if counts is None:
        counts, c = [], 5
        while c < per_subset:
            counts.append(c)
            c *= 2
        counts.append(per_subset)
    return sorted({_positive(c, "stability count") for c in counts if c <= per_subset})


def _rank(keys: dict[str, Any], aggregate: str) -> np.ndarray:
    """Flat neuron indices best first; exact ties fall back to mean_abs, then to the lower index."""
    primary = np.asarray(keys[aggregate]).ravel()
    secondary = np.asarray(keys["mean_abs"]).ravel()
    return np.lexsort((np.arange(primary.size), -secondary, -primary))


def _rows(order: np.ndarray, scores: dict[str, np.ndarray], aggregate: str,
          experts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The neurons at flat indices `order`; in a mixture-of-experts layer (`experts`: its `layers` and `d_expert`)
    unit `e * d_expert + u` is neuron u of expert e, reported as `expert` and `unit`."""
    d_mlp = scores[aggregate].shape[1]
    rows = []
    for flat in order.tolist():
        layer, unit = divmod(int(flat), d_mlp)
        where = {"unit": unit}
        if experts and layer in experts["layers"]:
            where = dict(zip(("expert", "unit"), divmod(unit, experts["d_expert"])))
        row = {"layer": layer, **where, "score": float(scores[aggregate][layer, unit])}
        row.update({k: float(v[layer, unit]) for k, v in scores.items()})
        rows.append(row)
    return rows


def neuron_contributions(model: Any, batch: Any, positions: str = "answer") -> torch.Tensor:
    """[B, n_layers, units] float32: each sample's activation x gradient summed over its positions (a
    mixture-of-experts layer's units are its experts' neurons side by side, `knowmri.neuron_units`; an expert's
    are zero at the tokens not routed to it).

    One forward and one backward for the batch; the gradient is of the sum over samples of
    each sample's mean answer log-likelihood (rows do not interact, so row b's gradient is
    sample b's own).
    """
    n_layers = model.n_layers
    with Hooks(model) as h:
        h.edit("embed", lambda x: x if x.requires_grad else x.detach().requires_grad_(True))
        parts = [(layer, h.read(name, grad=True), lo, hi) for layer in range(n_layers)
                 for name, lo, hi in neuron_units.slices(model, layer)]
        with torch.enable_grad():
            logits = model.forward(**batch.inputs)
            objective = batch.per_sample_mean(batch.answer_logprobs(logits)).sum()
            acts = [c.value for _, c, _, _ in parts]
            grads = torch.autograd.grad(objective, acts, allow_unused=True)
    mask = batch.answer_mask if positions == "answer" else batch.token_mask
    out = torch.zeros(batch.size, n_layers, neuron_units.width(model), dtype=torch.float32, device=model.device)
    for (layer, _, lo, hi), a, g in zip(parts, acts, grads):
        if g is None:
            continue
        m = mask.to(device=a.device, dtype=torch.float32)[:, :, None]
        out[:, layer, lo:hi] = (a.detach().float() * g.float() * m).sum(1).to(out.device)
    return out


def _check_params(top_k: Any, top_fraction: Any, subsets: Any, aggregate: str, positions: str, batch_size: Any,
                  sample_top_fraction: float) -> None:
    if top_k is not None:
        _positive(top_k, "top_k")
    if top_fraction is not None and not 0.0 < float(top_fraction) <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    if top_k is not None and top_fraction is not None:
        raise ValueError("give top_k or top_fraction, not both")
    _positive(subsets, "subsets")
    _positive(batch_size, "batch_size")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if positions not in ("answer", "all"):
        raise ValueError(f"positions must be 'answer' or 'all', got {positions!r}")
    if not 0.0 < sample_top_fraction <= 1.0:
        raise ValueError(f"sample_top_fraction must be in (0, 1], got {sample_top_fraction}")


def localize(dataset: Any, model: Any, *, samples: int | None = None, top_k: int | None = None,
             top_fraction: float | None = None, subsets: int = 2, counts: list[int] | None = None,
             aggregate: str = "mean_abs", positions: str = "answer", answer_key: str = "ground_truth",
             max_answer_tokens: int | None = None, template: str | None = None, batch_size: int = 8,
             sample_top_fraction: float = 0.01, seed: int = 0, path: str | None = None,
             progress: bool = True) -> Localization:
    """Locate the MLP neurons behind a capability over a dataset and measure how stable they are.

    `top_k` (or `top_fraction` of all neurons; default 0.1%, at least 10) neurons are kept.
    `subsets` disjoint subsets are compared at `counts` samples each (default 5, 10, 20, ...,
    up to n // subsets). Runs data-parallel under `accelerate launch` (see module docstring).
    """
    start = time.perf_counter()
    _check_params(top_k, top_fraction, subsets, aggregate, positions, batch_size, sample_top_fraction)
    if max_answer_tokens is not None:
        _positive(max_answer_tokens, "max_answer_tokens")
    items, info = as_samples(dataset, samples=samples, path=path)
    check_answers(items, answer_key)
    if "gradients" not in model.capabilities:
        raise ValueError(f"{model.name} does not support gradients, which localisation needs")
    n, n_layers, d_mlp = len(items), model.n_layers, neuron_units.width(model)
    total = n_layers * d_mlp
    k = min(total, top_k if top_k is not None else max(1, round(top_fraction * total)) if top_fraction is not None
            else max(10, math.ceil(0.001 * total)))
    per_subset = n // subsets if subsets > 1 else 0
    checkpoints = stability_counts(per_subset, counts) if per_subset else []
    # deal the samples (seeded) into subsets; sample i -> (subset, checkpoint bucket) or none
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    bucket = [-1] * n
    for p, i in enumerate(order):
        s, r = p % subsets, p // subsets
        j = next((j for j, c in enumerate(checkpoints) if r < c), None)
        if subsets > 1 and j is not None:
            bucket[i] = s * len(checkpoints) + j
    procs = processes()
    acc_device = model.device
    n_buckets = subsets * len(checkpoints)
    totals = torch.zeros(3, 2, total, dtype=torch.long, device=acc_device)  # |c|, c, top-set count; 2 limbs
    key = {"mean_abs": 0, "mean": 1, "frequency": 2}[aggregate]
    n_keys = 2 if aggregate == "frequency" else 1  # frequency keeps |c| per bucket for its tie-break
    buckets = torch.zeros(n_keys, max(n_buckets, 1), 2, total, dtype=torch.long, device=acc_device)
    counters = torch.zeros(3, dtype=torch.long, device=acc_device)  # samples, answer tokens, bound on sum |c|
    m = max(1, round(sample_top_fraction * total))
    mine = procs.shard(batches(range(n), batch_size))
    bar = progress_bar(sum(len(b) for b in mine), "localize", progress and procs.main)
    for idx in mine:
        encs = [teacher_forced(model, items[i], answer_key=answer_key, template=template,
                               max_answer_tokens=max_answer_tokens) for i in idx]
        batch = collate(model, encs)
        contrib = neuron_contributions(model, batch, positions).to(acc_device).double().view(len(idx), -1)
        biggest = float(contrib.abs().max()) if contrib.numel() else 0.0
        if not math.isfinite(biggest):
            raise ValueError("a contribution score is not finite (overflow in the model's dtype?): try float32")
        top = torch.zeros_like(contrib).scatter_(1, contrib.abs().topk(m, dim=1).indices, 1.0)
        per_key = (_to_fixed(contrib.abs()), _to_fixed(contrib), _to_fixed(top))
        for a in range(3):
            totals[a] += per_key[a].sum(0)
        rows = [r for r, i in enumerate(idx) if bucket[i] >= 0]
        if rows:
            where = torch.tensor([bucket[idx[r]] for r in rows], device=acc_device)
            picked = torch.tensor(rows, device=acc_device)
            buckets[0].index_add_(0, where, per_key[key][picked])
            if n_keys == 2:
                buckets[1].index_add_(0, where, per_key[0][picked])
        counters += torch.tensor([len(idx), int(batch.ids.numel()), math.ceil(biggest) * len(idx)], device=acc_device)
        bar.update(len(idx))
    bar.close()
    # one reduction of every sum over the processes (exact: integer addition is associative)
    flat = procs.all_reduce_sum(torch.cat([totals.view(-1), buckets.view(-1), counters]))
    totals = flat[: totals.numel()].view_as(totals).cpu()
    buckets = flat[totals.numel(): totals.numel() + buckets.numel()].view_as(buckets).cpu()
    counters = flat[-3:].cpu()
    if int(counters[2]) >= _BOUND:
        raise ValueError("the contribution scores are too large for the exact accumulators (sum of |c| >= 2^38)")
    if int(counters[0]) != n:
        raise RuntimeError(f"processed {int(counters[0])} samples, expected {n}: the processes disagree on the data")
    scores = {name: (_from_fixed(totals[a]) / n).view(n_layers, d_mlp).numpy()
              for a, name in enumerate(("mean_abs", "mean", "frequency"))}
    experts = {"layers": list(model.moe_layers), "d_expert": model.d_expert} if getattr(model, "moe_layers", ()) else None
    neurons = _rows(_rank(scores, aggregate)[:k], scores, aggregate, experts)
    stability = _stability(buckets, subsets, checkpoints, k, aggregate)
    layer_distribution = _layers(neurons, scores[aggregate], n_layers)
    params = {"samples": n, "top_k": k, "subsets": subsets, "counts": checkpoints, "aggregate": aggregate,
              "positions": positions, "answer_key": answer_key, "max_answer_tokens": max_answer_tokens,
              "template": template, "batch_size": batch_size, "sample_top_fraction": sample_top_fraction,
              "sample_top_count": m, "seed": seed, **({"experts": experts} if experts else {})}
    result = Localization(neurons, stability, layer_distribution, params, model.info(), info,
                          seconds=time.perf_counter() - start, scores=scores,
                          provenance=_provenance(procs.world, int(counters[1])))
    result.summary = _summary(result)
    return result


def _to_fixed(x: torch.Tensor) -> torch.Tensor:
    """[B, F] float64 -> [B, 2, F] int64 limbs (hi in units of 2^-24, lo of 2^-56): exact, order-free sums."""
    y = x * _HI
    hi = torch.round(y)
    return torch.stack([hi, torch.round((y - hi) * _LO)], 1).long()


def _from_fixed(t: torch.Tensor) -> torch.Tensor:
    """[2, ...] int64 limbs -> float64 values."""
    return (t[0].double() + t[1].double() / _LO) / _HI


def _stability(buckets: torch.Tensor, subsets: int, checkpoints: list[int], k: int, aggregate: str) -> list[dict]:
    if not checkpoints:
        return []
    per = buckets.view(buckets.shape[0], subsets, len(checkpoints), 2, -1).cumsum(2)
    out = []
    for j, count in enumerate(checkpoints):
        sets = []
        for s in range(subsets):
            keys = {aggregate: _from_fixed(per[0, s, j]).numpy(), "mean_abs": _from_fixed(per[-1, s, j]).numpy()}
            sets.append(set(_rank(keys, aggregate)[:k].tolist()))
        pairs = [(len(a & b), len(a | b)) for a, b in combinations(sets, 2)]
        out.append({"samples": count, "overlap": float(np.mean([i / k for i, _ in pairs])),
                    "iou": float(np.mean([i / u for i, u in pairs])), "pairs": len(pairs)})
    return out


def _layers(neurons: list[dict], score: np.ndarray, n_layers: int) -> list[dict]:
    counts = np.zeros(n_layers, dtype=int)
    for nrn in neurons:
        counts[nrn["layer"]] += 1
    mass = np.clip(score, 0, None).sum(1)
    share = mass / mass.sum() if mass.sum() > 0 else mass
    return [{"layer": i, "count": int(counts[i]), "score_share": float(share[i])} for i in range(n_layers)]


def _provenance(world: int, tokens: int) -> dict[str, Any]:
    from knowmri.report.report import versions

    return {"processes": world, "answer_tokens": tokens, "versions": versions(),
            "accumulator": "int64 fixed point, 2^-32 units (exact, order-independent)",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _summary(loc: Localization) -> str:
    p, n = loc.params, loc.params["samples"]
    dist = sorted(loc.layer_distribution, key=lambda d: -d["count"])
    where = ", ".join(f"layer {d['layer']} ({d['count']})" for d in dist[:3] if d["count"])
    best = loc.neurons[0]
    text = (f"Over {n} samples of {loc.dataset.get('name', 'the dataset')}, the {p['top_k']} neurons with the highest "
            f"{_DESCRIBE[p['aggregate']]} lie mostly in {where}; the strongest is L{best['layer']}.{'E' + str(best['expert']) + '.' if 'expert' in best else ''}U{best['unit']} "
            f"(score {best['score']:.3g}).")
    if loc.stability:
        last = loc.stability[-1]
        text += (f" Disjoint subsets of {last['samples']} samples each agree on {last['overlap']:.0%} of their "
                 f"top-{p['top_k']} neurons (IoU {last['iou']:.2f})")
        first = loc.stability[0]
        text += f", up from {first['overlap']:.0%} at {first['samples']} samples." if len(loc.stability) > 1 else "."
    return text


def compare_localizations(a: Localization | dict[str, Any], b: Localization | dict[str, Any]) -> dict[str, Any]:
    """Which located neurons two localisations (e.g. math and emotion) share: the neurons, overlap and IoU."""
    da = a.to_dict() if isinstance(a, Localization) else a
    db = b.to_dict() if isinstance(b, Localization) else b
    for d in (da, db):
        if not isinstance(d, dict) or "neurons" not in d:
            raise ValueError("compare_localizations takes two Localization results (or their to_dict())")
    ra = {(n["layer"], n["unit"]): (i, n["score"]) for i, n in enumerate(da["neurons"])}
    rb = {(n["layer"], n["unit"]): (i, n["score"]) for i, n in enumerate(db["neurons"])}
    if not ra or not rb:
        raise ValueError("both localisations need at least one neuron")
    common = sorted(set(ra) & set(rb), key=lambda x: ra[x][0] + rb[x][0])
    shared = [{"layer": lu[0], "unit": lu[1], "rank_a": ra[lu][0] + 1, "rank_b": rb[lu][0] + 1,
               "score_a": ra[lu][1], "score_b": rb[lu][1]} for lu in common]
    layers: dict[int, int] = {}
    for s in shared:
        layers[s["layer"]] = layers.get(s["layer"], 0) + 1
    return {"a": da.get("dataset", {}).get("name"), "b": db.get("dataset", {}).get("name"),
            "k_a": len(ra), "k_b": len(rb), "shared": shared, "n_shared": len(shared),
            "overlap": len(shared) / min(len(ra), len(rb)), "iou": len(shared) / len(set(ra) | set(rb)),
            "layers_shared": [{"layer": k, "count": v} for k, v in sorted(layers.items())]}
