"""Every registered method x every tiny architecture: it runs where eligible, and its result is a
valid report entry (status, summary, JSON-ready findings, tables, figures)."""

import dataclasses
import json

import pytest

import knowmri as km
from knowmri.methods.base import RunContext, list_methods
from knowmri.testing import FAMILIES, tiny_model

FACT = {"prompt": "The Eiffel Tower is located in the city of", "ground_truth": " Paris",
        "triple_subject": "Eiffel Tower", "triple_relation": "is located in the city of", "triple_object": "Paris",
        "target_new": " Rome", "prompts": ["The Eiffel Tower is located in the city of", "The Eiffel Tower is in the city of"]}

#: Small settings so the matrix stays fast; names that a method does not have are ignored.
QUICK = {"samples": 2, "window": 2, "steps": 2, "ig_steps": 2, "max_new_tokens": 4, "epochs": 2,
         "vocab_limit": 200, "hidden_dim": 32, "internal_batch_size": 4}


def quick_params(cls):
    names = {f.name for f in dataclasses.fields(cls.Params)}
    return {k: v for k, v in QUICK.items() if k in names}


METHODS = [cls.name for cls in list_methods()]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_on_family(method, family, tmp_path, monkeypatch):
    monkeypatch.setenv("KNOWMRI_HOME", str(tmp_path))
    model = tiny_model(family)
    sample = km.Sample(FACT)
    match = {m.name: m for m in km.match(sample, model)}[method]
    if not match.eligible:
        assert match.reasons, "an ineligible method must say why"
        pytest.skip("; ".join(match.reasons))
    cls = type(km.methods.base.get_method(method))
    from knowmri.diagnosis import run_method

    result = run_method(cls(), model, sample, quick_params(cls), RunContext())
    assert result.status == "ok", result.error
    assert result.summary.strip()
    data = result.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["path"] == list(cls.path)
    for table in data["tables"]:
        assert all(len(row) == len(table["columns"]) for row in table["rows"]), table["name"]
    for fig in data["figures"]:
        assert "data" in fig["plotly"]
    for key in ("token_scores", "layer_scores", "neurons"):
        for item in data["findings"].get(key, []):
            assert "score" in item
