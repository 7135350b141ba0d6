"""The MoE routing read-out: eligible only for MoE models; it names the experts the router picks."""

import json

import pytest
import torch

import knowmri as km
from knowmri.hooks import Hooks, site
from knowmri.testing.tiny import MOE_FAMILIES, TOP_K, tiny_model

FACT = {"prompt": "The Eiffel Tower is located in the city of", "ground_truth": " Paris", "triple_subject": "Eiffel Tower"}


def test_not_eligible_for_dense_models():
    match = {m.name: m for m in km.match(km.Sample(FACT), tiny_model("llama"))}["moe_routing"]
    assert not match.eligible and "moe" in " ".join(match.reasons)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routing_matches_the_router(family):
    model = tiny_model(family)
    report = km.diagnose(FACT, model, methods=["moe_routing"], progress=False)
    result = report.results["moe_routing"]
    assert result.status == "ok", result.error
    json.dumps(result.to_dict(), allow_nan=False)
    findings = result.findings
    assert len(findings["routing"]) == model.n_layers
    enc = model.encode(FACT["prompt"], FACT["ground_truth"])
    with Hooks(model) as h:
        cap = h.read(site(1, "moe.router"))
        model.forward(**enc.inputs())
    top = set(cap.value[0, enc.pred_pos].topk(TOP_K).indices.tolist())
    assert {e["expert"] for e in findings["routing"][1]["last"] if e["routed"]} == top
    assert all(len([e for e in r["subject"] if e["routed"]]) == TOP_K for r in findings["routing"])
    assert result.figures and result.summary


def test_top_n_lists_unrouted_experts():
    model = tiny_model("mixtral")
    report = km.diagnose(FACT, model, methods=["moe_routing"], params={"moe_routing": {"top_n": 4}}, progress=False)
    layer = report.results["moe_routing"].findings["routing"][0]["last"]
    assert len(layer) == 4 and sum(e["routed"] for e in layer) == TOP_K
    assert torch.tensor([e["prob"] for e in layer]).diff().le(1e-7).all()
