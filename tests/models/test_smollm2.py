"""Integration: the embedded default model (SmolLM2-135M, from its packaged GGUF) knows a fact."""

from __future__ import annotations

import pytest

from knowmri.models import Model, load_model
from knowmri.models.presets import home

pytestmark = pytest.mark.smollm2


def test_eiffel_tower(smollm2: Model) -> None:
    token, prob = smollm2.predict("The Eiffel Tower is located in the city of", top_k=1)[0]
    assert token == " Paris"
    assert prob > 0.5
    assert smollm2.spec.family == "llama" and smollm2.kind == "causal"
    assert smollm2.n_layers == 30 and smollm2.d_model == 576


def test_preset_is_cached(smollm2: Model) -> None:
    cache = home() / "models" / "smollm2-135m"
    assert (cache / "knowmri-source.json").is_file()
    again = load_model("smollm2-135m")
    assert again.n_layers == smollm2.n_layers and again.name == "smollm2-135m"
