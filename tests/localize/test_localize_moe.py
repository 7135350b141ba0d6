"""Capability localisation on mixture-of-experts models: expert neurons scored as units, reported with their
expert; the planted expert neuron found."""

from __future__ import annotations

import numpy as np
import pytest

from knowmri.localize import localize
from knowmri.sample import Sample
from knowmri.testing.planted_moe import planted_moe
from knowmri.testing.tiny import D_EXPERT, MOE_FAMILIES, N_EXPERTS, tiny_model
from tests.localize.conftest import capitals


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_moe_family(family: str) -> None:
    model = tiny_model(family)
    loc = localize(capitals(4), model, top_k=3, subsets=1, progress=False)
    assert loc.scores["mean_abs"].shape == (model.n_layers, N_EXPERTS * D_EXPERT)
    assert np.isfinite(loc.scores["mean_abs"]).all() and loc.neurons[0]["score"] > 0
    assert all(0 <= n["expert"] < N_EXPERTS and 0 <= n["unit"] < D_EXPERT for n in loc.neurons)
    assert loc.top(2) == loc.neurons[:2]
    assert "E" in loc.tables()[0]["rows"][0][2]


def test_finds_the_planted_expert_neuron() -> None:
    planted = planted_moe()
    data = [Sample(prompt=p, ground_truth=" Paris") for p in ("The Eiffel Tower is located in the city of",
                                                              "The Eiffel Tower is in the city of")]
    loc = localize(data, planted.model, top_k=1, subsets=1, progress=False)
    best = loc.neurons[0]
    assert (best["layer"], best["expert"], best["unit"]) == planted.expert


def test_enhance_refuses_expert_neurons() -> None:
    from knowmri.localize import enhance

    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="mixture of experts"):
        enhance(capitals(4), model, [{"layer": 0, "expert": 1, "unit": 2}], progress=False)
