"""Capability enhancement: fine-tune only the located neurons, against as many random neurons and no tuning.

Each tuned neuron (l, u) gets trainable deltas for its own weights: its row of the MLP's
input projection (and of the gate projection in gated MLPs) and its column of the down
projection. The deltas are added through forward hooks (zero-initialised, float32), so
the model's weights are never written: every arm starts from the same model and the model
is unchanged afterwards. Training: Adam on the mean per-token negative log-likelihood of
the teacher-forced answers of a training split, dropout off (eval mode), the same seeded
sample order and budget for every arm. The control (`random`) is as many random neurons in
the same layers (layer-matched, disjoint from the located ones). Held-out metrics: loss
(mean per-token NLL), accuracy (every answer token is the top-1 prediction under teacher
forcing) and first-token accuracy. Under `accelerate launch` each batch is split across
the processes and the delta gradients are all-reduced each step (data-parallel training).
"""

from __future__ import annotations

import contextlib
import json
import numbers
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from knowmri.localize._core import (
    as_samples,
    batches,
    check_answers,
    collate,
    progress_bar,
    split_indices,
    teacher_forced,
)
from knowmri.parallel import Processes, processes

ARMS = ("located", "random", "base")
Deltas = dict[int, dict[str, torch.Tensor]]  # layer -> units, mlp_in, mlp_gate (gated MLPs), mlp_down


def neuron_list(neurons: Any, model: Any) -> list[tuple[int, int]]:
    """(layer, unit) pairs, validated and de-duplicated, from a Localization, dicts or pairs."""
    if hasattr(neurons, "neurons") and not isinstance(neurons, (list, tuple)):
        neurons = neurons.neurons
    if isinstance(neurons, dict) and "neurons" in neurons:
        neurons = neurons["neurons"]
    out: list[tuple[int, int]] = []
    for n in neurons or []:
        layer, unit = (n["layer"], n["unit"]) if isinstance(n, dict) else n
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (layer, unit)):
            raise ValueError(f"a neuron is a (layer, unit) pair of integers, got {n!r}")
        layer, unit = int(layer), int(unit)
        if layer in getattr(model, "moe_layers", ()):
            raise ValueError(f"layer {layer} is a mixture of experts: enhancing expert neurons is not supported "
                             "(only dense MLP neurons can be tuned)")
        if not (0 <= layer < model.n_layers and 0 <= unit < model.d_mlp):
            raise ValueError(f"neuron ({layer}, {unit}) is out of range: {model.n_layers} layers of {model.d_mlp} neurons")
        if (layer, unit) not in out:
            out.append((layer, unit))
    if not out:
        raise ValueError("give at least one neuron to enhance")
    return out


def random_like(neurons: list[tuple[int, int]], d_mlp: int, seed: int) -> list[tuple[int, int]]:
    """As many random neurons per layer as `neurons` has, none of them located (a layer-matched control)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    by_layer: dict[int, set[int]] = {}
    for layer, unit in neurons:
        by_layer.setdefault(layer, set()).add(unit)
    out = []
    for layer in sorted(by_layer):
        pool = [u for u in range(d_mlp) if u not in by_layer[layer]]
        k = len(by_layer[layer])
        if k > len(pool):
            raise ValueError(f"layer {layer} has too few other neurons ({len(pool)}) for a random control of {k}")
        out += [(layer, pool[i]) for i in sorted(torch.randperm(len(pool), generator=gen)[:k].tolist())]
    return out


def _module(model: Any, layer: int, key: str) -> nn.Module | None:
    try:
        return model.component(layer, key)
    except ValueError:
        return None


def new_deltas(model: Any, neurons: list[tuple[int, int]]) -> Deltas:
    """Zero deltas (float32, on each layer's device) for the neurons' input/gate rows and down columns."""
    out: Deltas = {}
    for layer in sorted({n[0] for n in neurons}):
        units = sorted(u for lyr, u in neurons if lyr == layer)
        entry: dict[str, torch.Tensor] = {}
        for key in ("mlp_in", "mlp_gate", "mlp_down"):
            module = _module(model, layer, key)
            if module is None:
                continue
            weight = model.linear_weight(module)  # [out, in]
            width = weight.shape[1] if key != "mlp_down" else weight.shape[0]
            entry[key] = torch.zeros(len(units), width, dtype=torch.float32, device=weight.device, requires_grad=True)
        entry["units"] = torch.tensor(units, dtype=torch.long, device=entry["mlp_down"].device)
        out[layer] = entry
    return out


@contextlib.contextmanager
def apply_deltas(model: Any, deltas: Deltas) -> Iterator[None]:
    """Run the model with the deltas added through hooks (weights untouched; removed on exit)."""
    handles = []

    def rows_hook(units: torch.Tensor, delta: torch.Tensor) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0].to(delta.device)
            extra = (x @ delta.to(x.dtype).T).to(output.device, output.dtype)
            return output.index_add(output.dim() - 1, units.to(output.device), extra)
        return hook

    def cols_hook(units: torch.Tensor, delta: torch.Tensor) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0].to(delta.device)
            picked = x.index_select(x.dim() - 1, units.to(x.device))
            return output + (picked @ delta.to(picked.dtype)).to(output.device, output.dtype)
        return hook

    try:
        for layer, entry in deltas.items():
            for key, delta in entry.items():
                if key == "units":
                    continue
                module = model.component(layer, key)
                make = cols_hook if key == "mlp_down" else rows_hook
                on_device = delta.to(model.linear_weight(module).device)  # the tensor itself when already there
                handles.append(module.register_forward_hook(make(entry["units"], on_device)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def merge_deltas(model: Any, deltas: Deltas) -> Iterator[None]:
    """Add the deltas into the weights in place (the tuned model as plain weights); restored on exit."""
    saved = []
    try:
        with torch.no_grad():
            for layer, entry in deltas.items():
                units = entry["units"]
                for key, delta in entry.items():
                    if key == "units":
                        continue
                    weight = model.linear_weight(model.component(layer, key))
                    idx = units.to(weight.device)
                    if key == "mlp_down":
                        saved.append((weight, idx, 1, weight[:, idx].clone()))
                        weight[:, idx] += delta.detach().to(weight.device, weight.dtype).T
                    else:
                        saved.append((weight, idx, 0, weight[idx].clone()))
                        weight[idx] += delta.detach().to(weight.device, weight.dtype)
        yield
    finally:
        with torch.no_grad():
            for weight, idx, axis, old in reversed(saved):
                if axis:
                    weight[:, idx] = old
                else:
                    weight[idx] = old


@contextlib.contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """No gradients into the model's own parameters (restored afterwards)."""
    flags = [(p, p.requires_grad) for p in model.hf_model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _evaluate(model: Any, encs: list[Any], batch_size: int, procs: Processes) -> dict[str, float]:
    sums = torch.zeros(4, dtype=torch.float64)  # nll, exact, first-token, samples
    with torch.no_grad():
        for idx in procs.shard(batches(range(len(encs)), batch_size)):
            batch = collate(model, [encs[i] for i in idx])
            logits = model.forward(**batch.inputs)
            nll = -batch.per_sample_mean(batch.answer_logprobs(logits))
            hit = batch.answer_hits(logits)
            sums += torch.tensor([float(nll.sum()), float(batch.per_sample_all(hit).sum()),
                                  float(batch.first_token(hit).sum()), len(idx)], dtype=torch.float64)
    sums = procs.all_reduce_sum(sums)
    n = float(sums[3])
    return {"loss": float(sums[0]) / n, "accuracy": float(sums[1]) / n, "first_token_accuracy": float(sums[2]) / n,
            "samples": int(n)}


def _train(model: Any, deltas: Deltas, encs: list[Any], *, epochs: int, lr: float, batch_size: int, seed: int,
           procs: Processes, bar: Any) -> list[float]:
    params = [t for entry in deltas.values() for k, t in entry.items() if k != "units"]
    opt = torch.optim.Adam(params, lr=lr)
    for p in params:
        p.grad = torch.zeros_like(p)
    losses = []
    with _frozen(model), apply_deltas(model, deltas):
        for epoch in range(epochs):
            order = torch.randperm(len(encs), generator=torch.Generator().manual_seed(seed * 1009 + epoch)).tolist()
            total = 0.0
            for idx in batches(order, batch_size):
                mine = procs.shard(idx)
                opt.zero_grad(set_to_none=False)
                loss = torch.zeros((), device=model.device)
                if mine:
                    with torch.enable_grad():
                        batch = collate(model, [encs[i] for i in mine])
                        logits = model.forward(**batch.inputs)
                        loss = -batch.per_sample_mean(batch.answer_logprobs(logits)).sum() / len(idx)
                        loss.backward()
                if procs.world > 1:
                    flat = procs.all_reduce_sum(torch.cat([p.grad.reshape(-1).to(model.device) for p in params]))
                    offset = 0
                    for p in params:
                        p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
                        offset += p.numel()
                opt.step()
                total += float(procs.all_reduce_sum(loss.detach().double().reshape(1).cpu())) * len(idx)
                bar.update(len(idx))
            losses.append(total / len(encs))
    return losses


@dataclass
class Enhancement:
    """Held-out loss and accuracy of the located, random and base arms, and the trained deltas."""

    arms: dict[str, dict[str, Any]]
    neurons: dict[str, list[dict[str, int]]]
    params: dict[str, Any]
    model: dict[str, Any]
    dataset: dict[str, Any]
    summary: str = ""
    seconds: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)
    deltas: dict[str, Deltas] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from knowmri.report.report import knowmri_version
        from knowmri.report.result import jsonable

        return jsonable({
            "knowmri_version": knowmri_version(), "kind": "enhancement", "model": self.model, "dataset": self.dataset,
            "params": self.params, "summary": self.summary, "seconds": self.seconds, **self.arms, "arms": self.arms,
            "neurons": self.neurons, "provenance": self.provenance,
        })

    def figures(self) -> list[tuple[str, Any]]:
        from knowmri.report import figures

        names = [a for a in ARMS if a in self.arms]
        out = [(f"Held-out {m}", figures.bars(names, [self.arms[a][m] for a in names], title=f"Held-out {m}",
                                              x_title="arm", y_title=m)) for m in ("loss", "accuracy")]
        curves = {a: self.arms[a]["train_loss"] for a in names if self.arms[a].get("train_loss")}
        if curves:
            out.append(("Training loss", figures.lines(list(range(1, self.params["epochs"] + 1)), curves,
                                                       title="Training loss per epoch", x_title="epoch", y_title="loss")))
        return out

    def tables(self) -> list[dict[str, Any]]:
        cols = ["arm", "neurons", "loss", "accuracy", "first_token_accuracy"]
        rows = [[a, len(self.neurons.get(a, [])), self.arms[a]["loss"], self.arms[a]["accuracy"],
                 self.arms[a]["first_token_accuracy"]] for a in ARMS if a in self.arms]
        return [{"name": "Held-out results", "columns": cols, "rows": rows}]

    def save(self, directory: str | Path) -> Path:
        """Write enhancement.json, index.html and the changed weights only (deltas_<arm>.safetensors)."""
        from knowmri.localize._page import write_page

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        for arm, deltas in self.deltas.items():
            save_deltas(out / f"deltas_{arm}.safetensors", deltas, {"arm": arm, "model": str(self.model.get("name"))})
        (out / "enhancement.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        write_page(out / "index.html", "Capability enhancement", data, self.figures(), self.tables())
        return out

    def _repr_html_(self) -> str:
        """The enhancement drawn inline in a notebook, as its index.html draws it."""
        from knowmri.localize._page import notebook_output

        return notebook_output("Capability enhancement", self.to_dict(), self.figures(), self.tables())

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/html": self._repr_html_(), "text/plain": self.summary or "Enhancement"}


def save_deltas(path: str | Path, deltas: Deltas, metadata: dict[str, str] | None = None) -> None:
    """The trained neuron weights as safetensors: layers.<l>.units, .mlp_in, .mlp_gate, .mlp_down."""
    from safetensors.torch import save_file

    tensors = {f"layers.{layer}.{key}": t.detach().cpu().contiguous() for layer, entry in deltas.items()
               for key, t in entry.items()}
    neurons = [[layer, int(u)] for layer, entry in deltas.items() for u in entry["units"].tolist()]
    save_file(tensors, str(path), metadata={**(metadata or {}), "neurons": json.dumps(neurons)})


def load_deltas(path: str | Path) -> Deltas:
    """Deltas written by `save_deltas` (on the CPU; `apply_deltas` moves them per layer)."""
    from safetensors.torch import load_file

    out: Deltas = {}
    for name, t in load_file(str(path)).items():
        _, layer, key = name.split(".", 2)
        out.setdefault(int(layer), {})[key] = t
    return out


def enhance(dataset: Any, model: Any, neurons: Any = None, *, samples: int | None = None, epochs: int = 3,
            lr: float = 1e-3, seed: int = 0, eval_fraction: float = 0.25, batch_size: int = 8,
            top_k: int | None = None, answer_key: str = "ground_truth", max_answer_tokens: int | None = None,
            template: str | None = None, path: str | None = None, progress: bool = True) -> Enhancement:
    """Fine-tune only `neurons` (or, when None, the neurons localised on the training split) and compare arms.

    The data is split (seeded) into a training part and a held-out part (`eval_fraction`).
    Arms: `located` (the given neurons), `random` (as many, layer-matched), `base` (no tuning).
    """
    start = time.perf_counter()
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    items, info = as_samples(dataset, samples=samples, path=path)
    check_answers(items, answer_key)
    train_idx, eval_idx = split_indices(len(items), eval_fraction, seed)
    opts = {"answer_key": answer_key, "template": template, "max_answer_tokens": max_answer_tokens}
    if neurons is None:
        from knowmri.localize.capability import localize

        loc = localize([items[i] for i in train_idx], model, top_k=top_k, subsets=1, batch_size=batch_size,
                       seed=seed, progress=progress, **opts)
        neurons = loc.neurons
    located = neuron_list(neurons, model)
    chosen = {"located": located, "random": random_like(located, model.d_mlp, seed)}
    encode = lambda i: teacher_forced(model, items[i], **opts)  # noqa: E731
    train, held_out = [encode(i) for i in train_idx], [encode(i) for i in eval_idx]
    procs = processes()
    bar = progress_bar(2 * epochs * len(train), "enhance", progress and procs.main)
    arms: dict[str, dict[str, Any]] = {"base": {**_evaluate(model, held_out, batch_size, procs), "train_loss": []}}
    trained: dict[str, Deltas] = {}
    for arm in ("located", "random"):
        deltas = new_deltas(model, chosen[arm])
        losses = _train(model, deltas, train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, procs=procs,
                        bar=bar)
        with apply_deltas(model, deltas):
            arms[arm] = {**_evaluate(model, held_out, batch_size, procs), "train_loss": losses}
        trained[arm] = {layer: {k: t.detach() for k, t in entry.items()} for layer, entry in deltas.items()}
    bar.close()
    arms = {a: arms[a] for a in ARMS}
    params = {"samples": len(items), "train": len(train_idx), "held_out": len(eval_idx), "epochs": epochs, "lr": lr,
              "seed": seed, "eval_fraction": eval_fraction, "batch_size": batch_size, "optimizer": "Adam",
              "random_control": "layer-matched", "neurons": len(located), **opts}
    as_dicts = {a: [{"layer": lyr, "unit": u} for lyr, u in chosen[a]] for a in chosen}
    from knowmri.report.report import versions

    result = Enhancement(arms, as_dicts, params, model.info(), info, seconds=time.perf_counter() - start,
                         provenance={"processes": procs.world, "versions": versions(),
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, deltas=trained)
    result.summary = _summary(result)
    return result


def _summary(r: Enhancement) -> str:
    b, loc, rnd = r.arms["base"], r.arms["located"], r.arms["random"]
    p = r.params
    verdict = ("helps more than tuning as many random neurons" if loc["loss"] < rnd["loss"]
               else "does not beat tuning as many random neurons")
    return (f"Fine-tuning only the {p['neurons']} located neurons ({p['epochs']} epochs on {p['train']} samples) moves "
            f"the held-out loss from {b['loss']:.3f} to {loc['loss']:.3f} (accuracy {b['accuracy']:.0%} to "
            f"{loc['accuracy']:.0%}); as many random neurons in the same layers reach {rnd['loss']:.3f} "
            f"({rnd['accuracy']:.0%}). On {p['held_out']} held-out samples, tuning the located neurons {verdict}.")
