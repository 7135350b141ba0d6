"""The consensus reads findings, not method names: a plug-in method whose findings carry
`token_scores`, `layer_scores` and `neurons` (or `sites`) joins every consensus table and the causal
verification with no other edit; the rank correlation equals scipy's; a failure never sinks a report."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import knowmri as km
from knowmri.analysis import build_consensus
from knowmri.analysis.consensus import spearman
from knowmri.methods.base import Method, Params, register_method, unregister_method
from knowmri.report.report import Report
from knowmri.report.result import MethodResult
from knowmri.testing import planted_model


@dataclass
class NoParams(Params):
    pass


def plug_in(method_name: str, findings: Any) -> None:
    """Register a method `method_name` whose findings are `findings(model, sample)`."""

    @register_method
    class PlugIn(Method):
        name = method_name
        title = "Plug-in under test"
        path = ("Internal", "Test")
        Params = NoParams

        def run(self, model: Any, sample: Any, params: Params, ctx: Any) -> MethodResult:
            result = self.new_result(params)
            result.findings = findings(model, sample)
            result.summary = "planted answers"
            return result


@pytest.fixture
def recall():
    """The "recall" planted model: one MLP neuron at the last position writes the answer."""
    return planted_model("gpt2", variant="recall")


@pytest.fixture
def locator(recall) -> Iterator[str]:
    """A plug-in that locates the planted neuron (and the subject's last token, and its layer)."""
    layer, unit = recall.neuron

    def findings(model: Any, sample: Any) -> dict[str, Any]:
        enc = model.encode(sample["prompt"], sample["ground_truth"])
        tokens = model.to_str_tokens(enc.input_ids[0, :enc.prompt_len])
        return {
            "token_scores": [{"index": i, "token": t, "score": 1.0 if i == recall.subject_span.stop - 1 else 0.1 * i}
                             for i, t in enumerate(tokens)],
            "layer_scores": [{"layer": i, "score": 1.0 if i == layer else 0.0} for i in range(model.n_layers)],
            "neurons": [{"layer": layer, "unit": u, "score": 1.0 / (1 + j)} for j, u in enumerate([unit, 3, 4, 5])],
        }

    plug_in("locator_test", findings)
    yield "locator_test"
    unregister_method("locator_test")


@pytest.fixture
def site_finder(recall) -> Iterator[str]:
    """A plug-in that locates the planted neuron's MLP output at the position it acts on, as a site."""
    layer, position = recall.neuron[0], recall.neuron_position

    def findings(model: Any, sample: Any) -> dict[str, Any]:
        return {"sites": [{"site": f"blocks.{layer}.mlp.out", "position": position, "token": " of", "score": 0.9,
                           "kind": "mlp"},
                          {"site": f"blocks.{layer}.attn.out", "position": position, "token": " of", "score": 0.1,
                           "kind": "attn"}]}

    plug_in("site_finder_test", findings)
    yield "site_finder_test"
    unregister_method("site_finder_test")


def table(consensus: dict[str, Any], start: str) -> dict[str, Any]:
    (found,) = [t for t in consensus["tables"] if t["name"].startswith(start)]
    return found


def test_plug_in_with_findings_joins_every_table_and_the_causal_check(recall, locator) -> None:
    report = km.diagnose(recall.sample, recall.model, methods=[locator, "knowledge_neurons", "causal_tracing"],
                         params={"knowledge_neurons": {"steps": 8}}, progress=False)
    assert report[locator].status == "ok" and report["knowledge_neurons"].status == "ok"
    c = report.consensus
    assert "error" not in c, c
    assert locator in c["methods"]
    tokens = table(c, "Token importance")
    assert locator in tokens["columns"]
    column = tokens["columns"].index(locator)
    assert [row[column] for row in tokens["rows"] if row[0] == recall.subject_span.stop - 1] == [1]
    assert c["token_top"][locator][0]["index"] == recall.subject_span.stop - 1
    assert locator in c["token_category_share"]
    assert any(locator in (p["a"], p["b"]) for p in c["token_agreement"])
    layers = table(c, "Layers each method points at")
    assert [locator + " (top-10 neurons, most common layer)", recall.neuron[0]] in [row[:2] for row in layers["rows"]]
    shared = {(n["layer"], n["unit"]): n["methods"] for n in c["shared_neurons"]}
    assert {locator, "knowledge_neurons"} <= set(shared[recall.neuron])
    assert locator in c["neurons_in_tracing_peak"]
    assert locator in c["verdict"]
    check = c["verification"]["methods"][locator]
    assert check["located"] == "top 4 neurons"
    assert check["holds"] and check["ablated"] < 0.5 * c["verification"]["base_prob"]
    verification = table(c, "Causal verification")
    assert [row for row in verification["rows"] if row[0] == locator][0][-1] == "yes"


def test_plug_in_with_sites_gets_its_best_site_checked(recall, site_finder) -> None:
    report = km.diagnose(recall.sample, recall.model, methods=[site_finder], progress=False)
    c = report.consensus
    layer, position = recall.neuron[0], recall.neuron_position
    assert c["peak_layers"] == {f"{site_finder} mlp": layer, f"{site_finder} attn": layer}
    check = c["verification"]["methods"][site_finder]
    assert check["located"] == f"MLP output of layer {layer} at token {position}"
    assert check["holds"]


def test_causal_tracing_sites_are_its_peaks_mlp_first(recall) -> None:
    report = km.diagnose(recall.sample, recall.model, methods=["causal_tracing"], progress=False)
    f = report["causal_tracing"].findings
    assert [s["kind"] for s in f["sites"]] == ["mlp", "attn", "hidden"]
    names = {"mlp": "mlp.out", "attn": "attn.out", "hidden": "resid_post"}
    for s in f["sites"]:
        peak = f["peaks"][s["kind"]]
        assert s["site"] == f"blocks.{peak['layer']}.{names[s['kind']]}" and s["position"] == peak["token"]
        assert s["score"] == pytest.approx(peak["effect"])
    mlp = f["peaks"]["mlp"]
    window = f["window"]  # the window it was traced with (params' 0 means depth-scaled)
    assert [s["window"] for s in f["sites"]] == [window, window, 1]  # verified over the window it was traced with
    check = report.consensus["verification"]["methods"]["causal_tracing"]
    layers = range(max(0, mlp["layer"] - window // 2), min(recall.model.n_layers, mlp["layer"] - (-window // 2)))
    where = f" (window of {len(layers)} layers: {layers[0]}-{layers[-1]})" if len(layers) > 1 else ""
    assert check["located"] == f"MLP output of layer {mlp['layer']} at token {mlp['token']}{where}"
    assert check["window"] == len(layers) and check["random_draws"] > 0 and "random_std" in check
    assert [r[0] for r in table(report.consensus, "Layers")["rows"]] == [f"causal_tracing {k}" for k in ("mlp", "attn", "hidden")]


def test_a_failure_never_sinks_the_report() -> None:
    report = Report(model={}, sample={}, results={"m": MethodResult("m", [], findings={"token_scores": [{"index": "x"}]})})
    out = build_consensus(report)
    assert out["error"].startswith("ValueError")


def test_spearman_equals_scipy() -> None:
    """The consensus's rank correlation (computed without importing scipy.stats) equals scipy's."""
    from scipy.stats import spearmanr

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(3, 12)
        a = [rng.choice([0.0, 1.0, 2.0, rng.random()]) for _ in range(n)]
        b = [rng.choice([0.0, 1.0, rng.random()]) for _ in range(n)]
        got = spearman(a, b)
        if got is not None:
            assert abs(got - spearmanr(a, b).statistic) < 1e-9
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def test_only_real_findings_enter_the_layer_and_neuron_tables() -> None:
    """No layer for a result that found nothing (holds False, first_top1_layer None, layer scores all 0),
    no generic neuron; every layer row says what backs it."""
    def result(name: str, **findings: Any) -> MethodResult:
        return MethodResult(name, ["Internal", "Test"], findings=findings)

    neurons = [{"layer": 2, "unit": 5, "score": 1.0}, {"layer": 2, "unit": 6, "score": 0.9},
               {"layer": 1, "unit": 9, "score": 0.8, "generic": True}]
    report = Report(model={}, sample={}, results={
        "nothing_decoded": result("nothing_decoded", holds=False,
                                  layer_scores=[{"layer": i, "score": 0.1 * i} for i in range(4)]),
        "never_top1": result("never_top1", first_top1_layer=None,
                             layer_scores=[{"layer": i, "score": 1 / 428} for i in range(4)]),
        "all_zero": result("all_zero", layer_scores=[{"layer": i, "score": 0.0} for i in range(4)]),
        "failed_site": result("failed_site", holds=False, sites=[{"site": "blocks.3.mlp.out", "position": 1, "score": 0.01}],
                              neurons=[{"layer": 2, "unit": 5, "score": 1.0}]),
        "tracer": result("tracer", holds=True, warnings=["small drop"],
                         sites=[{"site": "blocks.1.mlp.out", "position": 2, "score": 0.3, "kind": "mlp", "ci": [0.2, 0.4],
                                 "window": 2}]),
        "lens": result("lens", first_top1_layer=3, layer_scores=[{"layer": i, "score": 0.2 * i} for i in range(4)]),
        "finder": result("finder", neurons=neurons),
        "other_finder": result("other_finder", neurons=[{"layer": 1, "unit": 9, "score": 1.0, "generic": True},
                                                        {"layer": 2, "unit": 5, "score": 0.5}]),
        "scorer": result("scorer", layer_scores=[{"layer": i, "score": float(i == 2), "ci": [0.5, 1.5] if i == 2 else [0, 0]}
                                                 for i in range(4)]),
    })
    c = build_consensus(report)
    assert "error" not in c, c
    assert c["peak_layers"] == {"lens (answer appears)": 3, "tracer mlp": 1, "finder (top-10 neurons, most common layer)": 2,
                                "other_finder (top-10 neurons, most common layer)": 2, "scorer": 2}
    rows = {row[0]: row for row in table(c, "Layers each method points at")["rows"]}
    assert table(c, "Layers each method points at")["columns"] == ["method", "layer", "evidence"]
    assert rows["tracer mlp"][2] == "effect 0.3 (95% CI 0.2 to 0.4), window 2 layers; 1 warning"
    assert rows["finder (top-10 neurons, most common layer)"][2] == "2 of the top 2 neurons (1 generic neurons left out)"
    assert rows["scorer"][2] == "layer score 1 (95% CI 0.5 to 1.5), next best 0"
    assert rows["lens (answer appears)"][2] == "answer top-1 from this layer on, layer score 0.6"
    assert c["shared_neurons"] == [{"layer": 2, "unit": 5, "methods": ["finder", "other_finder"]}]  # not 1.9 (generic)
    assert c["found_nothing"] == ["failed_site", "nothing_decoded"]
    assert "failed_site" not in c["neurons_in_tracing_peak"] and "Found nothing" in c["verdict"]


def test_verification_skips_what_found_nothing_and_its_verdict_joins_the_evidence(recall, site_finder) -> None:
    report = km.diagnose(recall.sample, recall.model, methods=[site_finder, "causal_tracing"], progress=False)
    c = report.consensus
    rows = {row[0]: row for row in table(c, "Layers each method points at")["rows"]}
    assert rows[f"{site_finder} mlp"][2].endswith("when ablated)") and "causal check holds" in rows[f"{site_finder} mlp"][2]
    f = report["causal_tracing"].findings
    assert f["holds"] and "95% CI" in rows["causal_tracing mlp"][2]
    report["causal_tracing"].findings["holds"] = False
    again = build_consensus(report, recall.model, recall.sample)
    assert "causal_tracing" not in again["verification"]["methods"]
    assert not any(k.startswith("causal_tracing") for k in again["peak_layers"])
