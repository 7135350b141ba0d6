"""Dataset aggregation reads findings, not method names: token roles, mean layer scores, neuron counts,
and the effect grids behind a result's `sites`, for any method."""

from __future__ import annotations

import json

import pytest

from knowmri.analysis import Aggregator
from knowmri.report.report import Report
from knowmri.report.result import MethodResult
from knowmri.testing import planted_model

FACT = {"prompt": "The Eiffel Tower is located in the city of", "ground_truth": " Paris", "triple_subject": "Eiffel Tower"}


def traced(grid_value: float) -> MethodResult:
    """A plug-in's result with a [token][layer] grid under its sites' kind, and the other findings."""
    n_tokens, n_layers = 9, 4
    grid = [[grid_value if t == 2 else 0.0 for _ in range(n_layers)] for t in range(n_tokens)]
    return MethodResult("tracer", ["Internal", "Test"], findings={
        "sites": [{"site": "blocks.1.mlp.out", "position": 2, "token": " Tower", "score": grid_value, "kind": "restored"}],
        "restored": grid, "low_score": 0.0,
        "token_scores": [{"index": t, "token": "", "score": 1.0 if t == 2 else 0.0} for t in range(n_tokens)],
        "layer_scores": [{"layer": i, "score": float(i == 1)} for i in range(n_layers)],
        "neurons": [{"layer": 1, "unit": 7, "score": grid_value}],
    })


def test_any_result_with_sites_gets_its_grids_by_role() -> None:
    model = planted_model("gpt2").model
    agg = Aggregator(model)
    agg.add(0, FACT, {"tracer": traced(0.5)})
    agg.add(1, FACT, {"tracer": traced(0.3)})
    report = Report(model={}, sample={})
    agg.report(report)
    f = report["tracer"].findings
    assert f["restored_by_role"]["subject_last"] == pytest.approx([0.4] * 4)
    assert f["restored_by_role"]["subject_first"] == pytest.approx([0.0] * 4)
    assert f["role_share"]["subject_last"] == pytest.approx(1.0)
    assert f["top_role_counts"] == {"subject_last": 2}
    assert f["layer_scores"][1]["score"] == pytest.approx(1.0)
    assert f["neurons"] == [{"layer": 1, "unit": 7, "score": pytest.approx(0.4), "count": 2}]
    assert [fig["name"] for fig in report["tracer"].figures][-1] == "Average indirect effect (restored)"
    assert report.meta["n_samples"] == 2


def test_saved_reports_added_in_order_rebuild_the_same_aggregate() -> None:
    model = planted_model("gpt2").model
    streamed, rebuilt = Aggregator(model), Aggregator(model)
    saved = []
    for i, value in enumerate((0.5, 0.3, 0.2)):
        results = {"tracer": traced(value)}
        streamed.add(i, FACT, results, {"answer_prob": value})
        one = Report(model={}, sample=FACT, results=results, meta={"index": i})
        saved.append(json.loads(one.to_json()))  # as a dataset run saves it and reads it back
    for data in saved:
        rebuilt.add_saved(data, answer_prob=[0.5, 0.3, 0.2][data["index"]])
    a, b = Report(model={}, sample={}), Report(model={}, sample={})
    streamed.report(a)
    rebuilt.report(b)
    assert a.to_dict()["results"] == b.to_dict()["results"]
    assert a.meta["samples"] == b.meta["samples"] and b.meta["samples"][1]["answer_prob"] == 0.3
