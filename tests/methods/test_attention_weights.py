"""Attention weights: the planted copy head ranks first, patterns are well-formed on every family,
the model's attention implementation is restored, and SmolLM2 has heads that read the subject."""

import pytest
import torch

import knowmri as km
from knowmri.methods.base import RunContext, get_method
from knowmri.testing import FAMILIES, build_tiny, tiny_model

FACT = km.Sample(prompt="The Eiffel Tower is located in the city of", ground_truth=" Paris",
                 triple_subject="Eiffel Tower")


def run(model, sample, **params):
    method = get_method("attention_weights")
    return method.run(model, sample, method.Params.from_dict(params), RunContext())


def test_planted_copy_head_ranks_first(planted):
    f = run(planted.model, planted.sample).findings
    layer, head = planted.head
    assert (f["heads"][0]["layer"], f["heads"][0]["head"]) == (layer, head)
    assert f["heads"][0]["score"] > 0.9
    per_head = torch.tensor(f["last_token_attention_per_head"])
    assert int(per_head[layer, head].argmax()) == planted.neuron_position
    assert f["head_score_basis"] == "subject"
    assert max(f["layer_scores"], key=lambda s: s["score"])["layer"] == layer


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family):
    model = tiny_model(family)
    result = run(model, FACT)
    f = result.findings
    n_tok = len(f["tokens"])
    mean = torch.tensor(f["last_token_attention"])
    per_head = torch.tensor(f["last_token_attention_per_head"])
    assert mean.shape == (model.n_layers, n_tok)
    assert per_head.shape == (model.n_layers, model.n_heads, n_tok)
    torch.testing.assert_close(per_head.sum(-1), torch.ones(model.n_layers, model.n_heads), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_head.mean(1), mean)
    if model.kind == "causal":
        assert 0 in f["excluded_positions"]
        assert torch.all(per_head[..., f["position"] + 1:] == 0)
    scores = [h["score"] for h in f["heads"]]
    assert len(scores) == model.n_layers * model.n_heads and scores == sorted(scores, reverse=True)
    assert {s["index"] for s in f["token_scores"]}.isdisjoint(f["excluded_positions"])
    assert len(result.figures) == 3 and result.summary


def test_without_subject_ranks_by_content_tokens():
    model = tiny_model("llama")
    f = run(model, km.Sample(prompt="The Eiffel Tower is located in the city of")).findings
    assert f["head_score_basis"] == "content tokens"
    per_head = torch.tensor(f["last_token_attention_per_head"])
    content = [t for t in range(len(f["tokens"])) if t not in f["excluded_positions"] and t != f["position"]]
    top = f["heads"][0]
    assert top["score"] == pytest.approx(float(per_head[top["layer"], top["head"], content].sum()), abs=1e-6)


def test_restores_the_attention_implementation():
    model = build_tiny("llama")
    eager = run(model, FACT).findings
    model.hf_model.set_attn_implementation("sdpa")
    fused = run(model, FACT).findings
    assert model.hf_model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(torch.tensor(fused["last_token_attention_per_head"]),
                               torch.tensor(eager["last_token_attention_per_head"]))


@pytest.mark.smollm2
def test_smollm2_heads_read_the_subject(smollm2):
    before = smollm2.hf_model.config._attn_implementation
    f = run(smollm2, FACT).findings
    assert smollm2.hf_model.config._attn_implementation == before
    assert f["heads"][0]["score"] > 0.5
    assert f["heads"][0]["layer"] > 0
