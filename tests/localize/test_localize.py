"""Capability localisation: planted neurons found, scores equal a per-sample reference, stability, I/O, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import knowmri as km
from knowmri.localize import Localization, compare_localizations, localize
from knowmri.sample import Sample
from knowmri.testing import FAMILIES, planted_model, tiny_model
from tests.localize.conftest import capitals

PARAPHRASES = ["The Eiffel Tower is located in the city of", "The Eiffel Tower is in the city of",
               "Eiffel Tower is located in the city of", "The famous Eiffel Tower is located in the city of"]


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_finds_the_planted_neurons(style: str) -> None:
    planted = planted_model(style)
    data = [Sample(prompt=p, ground_truth=" Paris") for p in PARAPHRASES]
    data += [Sample(prompt=p.replace("Eiffel Tower", "Brandenburg Gate"), ground_truth=" Berlin") for p in PARAPHRASES]
    loc = localize(data, planted.model, top_k=2, positions="all", progress=False)
    found = {(n["layer"], n["unit"]) for n in loc.neurons}
    assert found == {planted.neuron, planted.other_neuron}
    only_paris = localize(data[:4], planted.model, top_k=1, positions="all", subsets=1, progress=False)
    assert (only_paris.neurons[0]["layer"], only_paris.neurons[0]["unit"]) == planted.neuron


def reference_contributions(model: km.Model, sample: Sample, positions: str) -> torch.Tensor:
    """The paper's loop, one sample at a time with plain torch hooks: [n_layers, d_mlp] of sum_t a * dlogp/da."""
    enc = model.encode(sample["prompt"], sample["ground_truth"])
    acts: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple) -> None:
        args[0].retain_grad()
        acts.append(args[0])

    handles = [model.component(layer, "mlp_down").register_forward_pre_hook(keep) for layer in range(model.n_layers)]
    try:
        logits = model.hf_model(**enc.inputs(), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    logp = logits[0, enc.target_positions].log_softmax(-1)[torch.arange(len(enc.target_ids)), enc.target_ids].mean()
    logp.backward()
    n_pos = logits.shape[1]
    keep_pos = enc.target_positions if positions == "answer" else list(range(n_pos))
    out = []
    for a in acts:
        a3, g3 = a.view(1, n_pos, -1), a.grad.view(1, n_pos, -1)
        out.append((a3 * g3)[0, keep_pos].sum(0))
    model.hf_model.zero_grad(set_to_none=True)
    return torch.stack(out).detach().double()


@pytest.mark.parametrize("family,positions", [("llama", "answer"), ("gpt2", "all"), ("opt", "answer"), ("t5", "answer")])
def test_scores_equal_a_per_sample_reference(family: str, positions: str) -> None:
    model = tiny_model(family)
    data = capitals(7)
    loc = localize(data, model, top_k=5, positions=positions, batch_size=3, progress=False)
    ref = torch.stack([reference_contributions(model, s, positions) for s in data])
    tol = 1e-5 * float(ref.abs().max())  # float32 rounding of the activation x gradient products
    np.testing.assert_allclose(loc.scores["mean_abs"], ref.abs().mean(0).numpy(), rtol=1e-5, atol=tol)
    np.testing.assert_allclose(loc.scores["mean"], ref.mean(0).numpy(), rtol=1e-5, atol=tol)
    flat = ref.abs().mean(0).flatten()
    assert [n["layer"] * model.d_mlp + n["unit"] for n in loc.neurons] == flat.argsort(descending=True)[:5].tolist()
    assert all(a["score"] >= b["score"] for a, b in zip(loc.neurons, loc.neurons[1:]))


def test_batching_does_not_change_the_result() -> None:
    model = tiny_model("llama")
    one = localize(capitals(6), model, top_k=5, batch_size=1, progress=False)
    four = localize(capitals(6), model, top_k=5, batch_size=4, progress=False)
    np.testing.assert_allclose(one.scores["mean_abs"], four.scores["mean_abs"], rtol=1e-5, atol=1e-9)
    assert [(n["layer"], n["unit"]) for n in one.neurons] == [(n["layer"], n["unit"]) for n in four.neurons]


def test_stability_curve_and_result_shape() -> None:
    model = tiny_model("llama")
    loc = localize(capitals(24), model, top_k=6, progress=False)
    d = loc.to_dict()
    assert [s["samples"] for s in d["stability"]] == [5, 10, 12]
    for s in d["stability"]:
        assert set(s) >= {"samples", "overlap", "iou"} and 0 <= s["iou"] <= s["overlap"] <= 1
    assert len(d["neurons"]) == 6 and set(d["neurons"][0]) >= {"layer", "unit", "score"}
    assert sum(x["count"] for x in d["layer_distribution"]) == 6 and len(d["layer_distribution"]) == model.n_layers
    assert d["params"]["aggregate"] == "mean_abs" and d["model"]["n_layers"] == model.n_layers
    assert d["provenance"]["processes"] == 1 and "summary" in d and d["summary"]
    three = localize(capitals(24), model, top_k=6, subsets=3, counts=[2, 4, 8], progress=False)
    assert [s["samples"] for s in three.stability] == [2, 4, 8] and three.stability[0]["pairs"] == 3
    json.dumps(d, allow_nan=False)


def test_other_aggregates_and_top_fraction() -> None:
    model = tiny_model("gpt2")
    freq = localize(capitals(8), model, aggregate="frequency", top_fraction=0.02, progress=False)
    assert len(freq.neurons) == round(0.02 * model.n_layers * model.d_mlp)
    assert all(0 <= n["score"] <= 1 for n in freq.neurons)
    assert all((a["score"], a["mean_abs"]) >= (b["score"], b["mean_abs"]) for a, b in zip(freq.neurons, freq.neurons[1:]))
    signed = localize(capitals(8), model, aggregate="mean", top_k=4, progress=False)
    assert signed.neurons[0]["score"] == signed.neurons[0]["mean"] == signed.scores["mean"].max()


def test_save_load_and_compare(tmp_path) -> None:
    model = tiny_model("llama")
    a = localize(capitals(12), model, top_k=8, progress=False)
    b = localize(capitals(24)[12:], model, top_k=8, progress=False)
    a.save(tmp_path)
    assert (tmp_path / "localization.json").is_file() and (tmp_path / "scores.npz").is_file()
    html = (tmp_path / "index.html").read_text()
    assert "Plotly" in html and "Agreement between disjoint subsets" in html
    again = Localization.load(tmp_path)
    assert again.neurons == a.neurons and again.stability == a.stability
    assert again.top(3) == a.neurons[:3]
    cmp = compare_localizations(a, b)
    assert cmp["n_shared"] == len(cmp["shared"]) and 0 <= cmp["iou"] <= cmp["overlap"] <= 1
    assert compare_localizations(a, a)["iou"] == 1.0


def test_km_localize_is_the_function() -> None:
    loc = km.localize(capitals(4), tiny_model("llama"), top_k=3, progress=False)
    assert isinstance(loc, Localization) and km.enhance.__name__ == "enhance"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family: str) -> None:
    model = tiny_model(family)
    loc = localize(capitals(4), model, top_k=3, subsets=1, progress=False)
    assert len(loc.neurons) == 3 and loc.scores["mean_abs"].shape == (model.n_layers, model.d_mlp)
    assert np.isfinite(loc.scores["mean_abs"]).all() and loc.neurons[0]["score"] > 0


def test_bad_input() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="empty"):
        localize([], model, progress=False)
    with pytest.raises(ValueError, match="ground_truth"):
        localize([Sample(prompt="The capital of Japan is")], model, progress=False)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="top_k"):
            localize(capitals(2), model, top_k=bad, progress=False)
    with pytest.raises(ValueError, match="not both"):
        localize(capitals(2), model, top_k=2, top_fraction=0.1, progress=False)
    with pytest.raises(ValueError, match="aggregate"):
        localize(capitals(2), model, aggregate="max", progress=False)
    with pytest.raises(ValueError, match="samples"):
        localize(capitals(2), model, samples=0, progress=False)


@pytest.mark.smollm2
def test_smollm2_emotion(smollm2: km.Model) -> None:
    data = km.load_dataset("emotion", limit=6)
    loc = localize(data, smollm2, top_k=20, counts=[3], progress=False)
    assert len(loc.neurons) == 20 and loc.stability[0]["samples"] == 3
    assert loc.scores["mean_abs"].shape == (30, smollm2.d_mlp)
