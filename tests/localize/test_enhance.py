"""Capability enhancement: the arms, the model left unchanged, only the chosen neurons trained, deltas saved."""

from __future__ import annotations

import pytest
import torch

from knowmri.localize import apply_deltas, enhance, load_deltas, merge_deltas
from knowmri.localize.tuning import random_like
from knowmri.testing import tiny_model
from tests.localize.conftest import capitals

NEURONS = [(0, 3), (1, 5), (1, 9), (2, 100)]


@pytest.fixture(scope="module")
def enhanced():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    flags = [p.requires_grad for p in model.hf_model.parameters()]
    result = enhance(capitals(16), model, [{"layer": lyr, "unit": u} for lyr, u in NEURONS], epochs=2, lr=1e-2,
                     batch_size=4, progress=False)
    return model, before, flags, result


def test_arms_and_contract(enhanced) -> None:
    _, _, _, result = enhanced
    d = result.to_dict()
    for arm in ("located", "random", "base"):
        assert set(d[arm]) >= {"loss", "accuracy"} and d["arms"][arm] == d[arm]
        assert 0 <= d[arm]["accuracy"] <= 1 and d[arm]["samples"] == 4
    assert len(d["located"]["train_loss"]) == 2 and d["base"]["train_loss"] == []
    assert d["located"]["train_loss"][1] < d["located"]["train_loss"][0]  # training the four neurons fits the data
    assert d["params"]["train"] == 12 and d["params"]["held_out"] == 4 and d["summary"]


def test_model_is_unchanged(enhanced) -> None:
    model, before, flags, _ = enhanced
    after = model.hf_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.hf_model.parameters()] == flags
    assert all(p.grad is None for p in model.hf_model.parameters())


def test_only_the_chosen_neurons_are_trained(enhanced) -> None:
    model, before, _, result = enhanced
    deltas = result.deltas["located"]
    enc = model.encode("The capital of Japan is", " Tokyo")
    with torch.no_grad(), apply_deltas(model, deltas):
        hooked = model.forward(**enc.inputs())
    with torch.no_grad(), merge_deltas(model, deltas):
        merged = model.forward(**enc.inputs())
        for layer in range(model.n_layers):
            units = [u for lyr, u in NEURONS if lyr == layer]
            others = [u for u in range(model.d_mlp) if u not in units]
            for key in ("mlp_in", "mlp_gate", "mlp_down"):
                module = model.component(layer, key)
                name = next(n for n, m in model.hf_model.named_modules() if m is module) + ".weight"
                new, old = module.weight, before[name]
                axis = 1 if key == "mlp_down" else 0
                keep = torch.tensor(others)
                assert torch.equal(new.index_select(axis, keep), old.index_select(axis, keep))
                if units:
                    assert not torch.equal(new.index_select(axis, torch.tensor(units)), old.index_select(axis, torch.tensor(units)))
        untouched = [k for k in before if ".mlp." not in k]
        state = model.hf_model.state_dict()
        assert all(torch.equal(before[k], state[k]) for k in untouched)
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.hf_model.state_dict().items())


def test_random_control_is_layer_matched_and_disjoint(enhanced) -> None:
    _, _, _, result = enhanced
    located = {(n["layer"], n["unit"]) for n in result.neurons["located"]}
    rnd = {(n["layer"], n["unit"]) for n in result.neurons["random"]}
    assert not located & rnd and len(rnd) == len(located)
    assert sorted(lyr for lyr, _ in rnd) == sorted(lyr for lyr, _ in located)
    assert random_like(NEURONS, 128, 0) == random_like(NEURONS, 128, 0)


def test_save_writes_only_the_deltas(enhanced, tmp_path) -> None:
    model, _, _, result = enhanced
    result.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"enhancement.json", "index.html", "deltas_located.safetensors",
                                                    "deltas_random.safetensors"}
    loaded = load_deltas(tmp_path / "deltas_located.safetensors")
    assert sorted(loaded) == [0, 1, 2] and loaded[1]["units"].tolist() == [5, 9]
    assert loaded[1]["mlp_in"].shape == (2, model.d_model) and loaded[1]["mlp_down"].shape == (2, model.d_model)
    enc = model.encode("The capital of Spain is", " Madrid")
    with torch.no_grad():
        with apply_deltas(model, loaded):
            a = model.forward(**enc.inputs())
        with apply_deltas(model, result.deltas["located"]):
            b = model.forward(**enc.inputs())
    torch.testing.assert_close(a, b)


def test_enhance_localises_when_no_neurons_are_given() -> None:
    model = tiny_model("gpt2")
    result = enhance(capitals(8), model, top_k=3, epochs=1, progress=False)
    assert len(result.neurons["located"]) == 3 and set(result.arms) == {"located", "random", "base"}


def test_bad_input() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        enhance(capitals(4), model, [(9, 0)], progress=False)
    with pytest.raises(ValueError, match="at least one neuron"):
        enhance(capitals(4), model, [], progress=False)
    with pytest.raises(ValueError, match="epochs"):
        enhance(capitals(4), model, [(0, 1)], epochs=0, progress=False)
    with pytest.raises(ValueError, match="at least 2 samples"):
        enhance(capitals(1), model, [(0, 1)], progress=False)
