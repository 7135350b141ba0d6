"""Router interventions in the causal verification: located experts (neurons that name their expert, sites of
kind "expert") are dropped and forced through the router, against unrelated facts and other experts."""

import pytest

import knowmri as km
from knowmri.analysis.expert_checks import located_expert
from knowmri.analysis.verification import (
    located_neurons,
    verification_table,
    verification_verdict,
    verify_localisations,
)
from knowmri.testing.planted_moe import planted_moe


def test_located_expert_reads_sites_then_neurons():
    assert located_expert({"sites": [{"site": "blocks.2.mlp.out", "position": 3, "kind": "mlp"},
                                     {"site": "blocks.2.moe.experts.1.out", "position": 3, "kind": "expert",
                                      "expert": 1}]}) == (2, 1)
    assert located_expert({"neurons": [{"layer": 1, "expert": 3, "unit": 4, "generic": True},
                                       {"layer": 2, "expert": 0, "unit": 9}]}) == (2, 0)
    assert located_expert({"neurons": [{"layer": 1, "unit": 4}]}) is None


@pytest.fixture(scope="module")
def planted():
    return planted_moe()


def test_planted_expert_holds_up_when_dropped(planted):
    layer, expert, unit = planted.expert
    report = km.diagnose(planted.sample, planted.model, methods=["fine", "causal_tracing"], progress=False,
                         consensus=False)
    assert located_neurons(report.results["fine"].findings, 1, planted.model) == [(layer, expert * 32 + unit)]
    outcome = verify_localisations(report.results, planted.model, planted.sample)
    for name in ("fine expert", "causal_tracing expert"):
        check = outcome["methods"][name]
        assert (check["kind"], check["layer"], check["expert"]) == ("expert", layer, expert)
        assert check["own"] < -0.9 and abs(check["control"]) < 0.05 and abs(check["random"]) < 0.05
        assert check["holds"]
    assert outcome["methods"]["fine"]["holds"], "the expert neuron ablated as a unit"
    table = verification_table(outcome)
    assert any(row[0] == "fine expert" for row in table["rows"])
    assert "other experts of the layer dropped" in verification_verdict(outcome)


def test_dense_results_get_no_expert_check():
    from knowmri.testing.planted import planted_model

    p = planted_model("llama", variant="recall")
    report = km.diagnose(p.sample, p.model, methods=["fine"], progress=False, consensus=False)
    outcome = verify_localisations(report.results, p.model, p.sample)
    assert all(c["kind"] != "expert" for c in outcome["methods"].values())
