"""Logit lens: the last layer reproduces the model's output, the planted answer appears at its layer."""

import pytest
import torch

import knowmri as km
from knowmri.hooks import Hooks, site
from knowmri.methods.base import RunContext, get_method
from knowmri.testing import FAMILIES, tiny_model

FACT = {
    "prompt": "The Eiffel Tower is located in the city of",
    "ground_truth": " Paris",
    "triple_subject": "Eiffel Tower",
}


def run(model, sample, **params):
    method = get_method("logit_lens")
    return method.run(model, km.Sample(sample), method.Params.from_dict(params), RunContext())


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_equals_model_output(family):
    model = tiny_model(family)
    sample = km.Sample(FACT)
    enc = model.encode(sample["prompt"], sample["ground_truth"])
    with torch.no_grad(), Hooks(model) as h:
        cap = h.read(site(model.n_layers - 1, "resid_post"))
        logits = model.forward(**enc.inputs())
    pos = enc.pred_pos
    lens = model.readout(cap.value[0, pos]).float().softmax(-1)
    output = logits[0, pos].float().softmax(-1)
    torch.testing.assert_close(lens, output, atol=1e-5, rtol=1e-4)

    findings = run(model, FACT).findings
    target = enc.target_ids[0]
    assert findings["target_prob"][-1] == pytest.approx(float(output[target]), abs=1e-5)
    assert findings["target_rank"][-1] == int((output > output[target]).sum()) + 1
    top = [model.tokenizer.decode([int(i)]) for i in output.topk(5).indices]
    assert findings["top_tokens"][-1] == top
    assert len(findings["target_prob"]) == len(findings["target_rank"]) == model.n_layers


def test_planted_answer_first_top_at_answer_layer(planted):
    findings = run(planted.model, dict(planted.sample)).findings
    layer = planted.answer_layer
    assert findings["first_top1_layer"] == layer
    assert findings["target_rank"][layer] == 1
    assert all(rank > 1 for rank in findings["target_rank"][:layer])
    assert len(findings["target_prob"]) == planted.model.n_layers
    assert findings["target_prob"][layer] == max(findings["target_prob"][: layer + 1])
    assert [s["layer"] for s in findings["layer_scores"]] == list(range(planted.model.n_layers))


def test_last_position_mode_matches_all_positions(planted):
    every = run(planted.model, dict(planted.sample), positions="all").findings
    last = run(planted.model, dict(planted.sample), positions="last").findings
    assert last["target_rank"] == every["target_rank"]
    assert last["target_prob"] == pytest.approx(every["target_prob"], abs=1e-6)
    assert last["positions"] == [every["position"]]


def test_without_ground_truth_uses_the_prediction():
    model = tiny_model("llama")
    prompt = FACT["prompt"]
    result = run(model, {"prompt": prompt})
    findings = result.findings
    assert findings["answer_source"] == "model prediction"
    assert findings["target_token"] == model.predict(prompt, top_k=1)[0][0]
    assert findings["target_rank"][-1] == 1
    assert "model prediction" in result.summary


@pytest.mark.smollm2
def test_smollm2_paris_becomes_top_in_late_layers(smollm2):
    result = run(smollm2, FACT, positions="last")
    findings = result.findings
    first = findings["first_top1_layer"]
    assert first is not None and first >= smollm2.n_layers // 2
    assert findings["target_rank"][-1] == 1
    assert findings["target_prob"][-1] == pytest.approx(smollm2.predict(FACT["prompt"], 1)[0][1], abs=1e-4)
    assert findings["target_rank"][0] > 1


def test_readout_in_small_batches_gives_the_same_findings(monkeypatch):
    from knowmri.methods import logit_lens

    model = tiny_model("llama")
    whole = run(model, FACT).findings
    monkeypatch.setattr(logit_lens, "READOUT_CHUNK_BYTES", 4 * model.vocab_size * 7)  # 7 rows per product
    parts = run(model, FACT).findings
    for key in ("target_rank", "top_tokens", "top1_grid", "first_top1_layer", "positions"):
        assert parts[key] == whole[key]
    assert parts["target_prob"] == pytest.approx(whole["target_prob"], rel=1e-5, abs=1e-7)
    for a, b in zip(parts["top1_prob_grid"], whole["top1_prob_grid"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
