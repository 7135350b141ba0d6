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
    (neuron,) = f["neurons"]
    assert (neuron["layer"], neuron["unit"], neuron["count"], neuron["frequency"]) == (1, 7, 2, 1.0)
    assert neuron["score"] == pytest.approx(0.4)
    assert [fig["name"] for fig in report["tracer"].figures][-1] == "Average indirect effect (restored)"
    assert report.meta["n_samples"] == 2


def test_every_mean_carries_its_confidence_interval() -> None:
    """A synthetic aggregate: each interval is the t-interval (Wilson's for frequencies) of the per-sample values."""
    from scipy import stats

    model = planted_model("gpt2").model
    agg = Aggregator(model)
    values = [0.5, 0.3, 0.1, 0.4]
    for i, v in enumerate(values):
        agg.add(i, FACT, {"tracer": traced(v)})
    agg.add(4, FACT, {"tracer": MethodResult("tracer", [], status="error")})
    report = Report(model={}, sample={})
    agg.report(report)
    f = report["tracer"].findings

    def t_ci(xs):
        xs = [float(x) for x in xs]
        return list(stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / len(xs), scale=stats.sem(xs)))

    assert f["restored_by_role"]["subject_last"] == pytest.approx([sum(values) / 4] * 4)
    ci = f["restored_by_role_ci"]["subject_last"]
    assert [ci["low"][0], ci["high"][0]] == pytest.approx(t_ci(values))
    assert ci["n"] == 4
    assert f["role_share_ci"]["subject_last"] == pytest.approx([1.0, 1.0])  # the same share in every sample
    assert f["subject_share_ci"] == pytest.approx([1.0, 1.0])
    assert f["layer_scores"][1]["ci"] == pytest.approx([1.0, 1.0]) and f["layer_scores"][0]["ci"] == pytest.approx([0, 0])
    (neuron,) = f["neurons"]
    assert neuron["score_ci"] == pytest.approx(t_ci(values))
    assert neuron["frequency"] == 1.0 and neuron["frequency_ci"][1] == 1.0 and 0.4 < neuron["frequency_ci"][0] < 0.6
    lo, hi = f["top_role_ci"]["subject_last"]
    assert hi == 1.0 and lo < 1.0
    tables = {t["name"]: t for t in report["tracer"].tables}
    assert "95% CI" in tables["Mean layer score"]["columns"]
    assert any("95% CI" in c for c in tables["Importance by token role"]["columns"])
    assert any("95% CI" in c for c in tables["Most frequently located neurons"]["columns"])
    assert "95% CI" in tables["Average indirect effect (restored): each role's peak layer"]["columns"]
    assert "95% CI" in report["tracer"].summary


def test_varying_layer_scores_get_t_intervals() -> None:
    from scipy import stats

    model = planted_model("gpt2").model
    agg = Aggregator(model)
    scores = [0.2, 0.6, 0.1]
    for i, v in enumerate(scores):
        result = traced(0.5)
        result.findings["layer_scores"] = [{"layer": 2, "score": v}]
        agg.add(i, FACT, {"tracer": result})
    report = Report(model={}, sample={})
    agg.report(report)
    got = report["tracer"].findings["layer_scores"][2]
    want = stats.t.interval(0.95, 2, loc=0.3, scale=stats.sem(scores))
    assert got["score"] == pytest.approx(0.3) and got["ci"] == pytest.approx(list(want))


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
