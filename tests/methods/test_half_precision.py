"""Every method in bfloat16 and float16 (the GPU paths, run here on the CPU): it runs, and it finds what
it finds in float32 on the planted-fact models ("recall": the answer is written by one neuron at the
last position, after a head copied the subject there)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import knowmri as km
from knowmri.diagnosis import run_method
from knowmri.methods.base import RunContext, get_method, list_methods
from knowmri.testing.planted import STYLES, Planted, build_planted

HALF = ("bfloat16", "float16")
METHODS = [cls.name for cls in list_methods()]


def _run(name: str, planted: Planted, model: Any) -> dict[str, Any]:
    result = run_method(type(get_method(name))(), model, planted.sample, {}, RunContext())
    assert result.status == "ok", result.error
    return result.findings


def _close(a: Any, b: Any, atol: float) -> None:
    diff = float((torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().max())
    assert diff <= atol, f"max |half - float32| = {diff:.4f} > {atol}"


def _top(items: list[dict[str, Any]], *keys: str) -> tuple:
    best = max(items, key=lambda item: item["score"])
    return tuple(best[k] for k in keys)


def _scores(items: list[dict[str, Any]]) -> list[float]:
    return [item["score"] for item in items]


def _check(name: str, half: dict[str, Any], full: dict[str, Any], planted: Planted) -> None:
    """What each method must still find in half precision (ties of the planted model aside)."""
    if name in ("knowledge_neurons", "fine"):
        assert _top(half["neurons"], "layer", "unit") == planted.neuron == _top(full["neurons"], "layer", "unit")
    elif name == "integrated_gradients":
        assert _top(half["token_scores"], "index") == _top(full["token_scores"], "index")
        scale = max(map(abs, _scores(full["token_scores"])))
        _close(_scores(half["token_scores"]), _scores(full["token_scores"]), 0.1 * scale)
    elif name == "causal_tracing":
        for grid in ("hidden", "mlp", "attn"):
            _close(half[grid], full[grid], 0.03)
        _close([half["high_score"], half["low_score"]], [full["high_score"], full["low_score"]], 0.02)
    elif name in ("logit_lens",):
        _close(half["target_prob"], full["target_prob"], 0.02)
        assert half["target_rank"][-1] == full["target_rank"][-1] == 1
    elif name == "attention_weights":
        _close(half["last_token_attention"], full["last_token_attention"], 0.02)
    elif name == "knowledge_circuits":
        assert {(e["src"], e["dst"]) for e in half["edges"][:3]} == {(e["src"], e["dst"]) for e in full["edges"][:3]}
    elif name == "patchscopes":
        _close(_scores(half["entity_word_prob"]), _scores(full["entity_word_prob"]), 0.05)
        assert half["holds"] == full["holds"]
    elif name == "embedding_projection":
        assert half["first_top1_layer"] == full["first_top1_layer"]
        assert _top(half["neurons"], "layer", "unit") == _top(full["neurons"], "layer", "unit")
    elif name == "self_explanation":
        assert half["answer"] == full["answer"]


@pytest.fixture(scope="module", params=STYLES, ids=list(STYLES))
def models(request: pytest.FixtureRequest) -> dict[str, Any]:
    planted = build_planted(request.param, variant="recall")
    out: dict[str, Any] = {"planted": planted, "float32": planted.model}
    for dtype in HALF:
        copy = build_planted(request.param, variant="recall").model
        out[dtype] = km.load_model(copy.hf_model, tokenizer=copy.tokenizer, dtype=dtype)
    return out


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", METHODS)
def test_method_in_half_precision_finds_what_float32_finds(method: str, dtype: str, models: dict[str, Any],
                                                           tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNOWMRI_HOME", str(tmp_path))
    model = models[dtype]
    assert model.dtype == getattr(torch, dtype)
    planted = models["planted"]
    _check(method, _run(method, planted, model), _run(method, planted, models["float32"]), planted)
