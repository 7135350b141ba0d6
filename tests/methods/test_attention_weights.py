"""Attention weights: the planted copy head ranks first, patterns are well-formed on every family,
the model's attention implementation is restored, and SmolLM2 has heads that read the subject."""

from pathlib import Path

import pytest
import torch

import knowmri as km
from knowmri.methods.attention_weights import attention_sinks
from knowmri.methods.base import RunContext, get_method
from knowmri.testing import FAMILIES, build_tiny, tiny_model
from knowmri.testing.planted import build_planted_sink

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
        assert torch.all(per_head[..., f["position"] + 1:] == 0)
    ids = (model.encode(FACT["prompt"]).input_ids[0, :n_tok] if model.kind != "seq2seq"
           else model.encode(FACT["prompt"]).input_ids[0]).tolist()
    special = {t for t, i in enumerate(ids) if i in set(model.tokenizer.all_special_ids)}
    assert f["excluded_positions"] == sorted(special | set(f["sinks"]))
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


@pytest.fixture(scope="module")
def sink_planted():
    return build_planted_sink()


def test_sink_is_not_the_headline(sink_planted):
    """Subject first, no BOS: every head but the planted one parks its attention on position 0, the subject's
    first token. Counted as attention to the subject, each of them would score ~1; the sink is found and left
    out, and the planted head, which reads the subject's last token, is the headline."""
    planted = sink_planted
    result = run(planted.model, planted.sample)
    f = result.findings
    per_head = torch.tensor(f["last_token_attention_per_head"])
    assert planted.subject_span.start == 0
    decoys = [(layer, head) for layer in range(per_head.shape[0]) for head in range(per_head.shape[1])
              if (layer, head) != planted.head and per_head[layer, head, 0] > 0.99]
    assert len(decoys) >= per_head.shape[0] * per_head.shape[1] - 1  # the trap is there
    assert f["sinks"] == [0] and 0 in f["excluded_positions"] and f["sink_heads"][0] > 0.9
    top = f["heads"][0]
    assert (top["layer"], top["head"]) == planted.head and top["score"] > 0.9
    assert f["head_score_basis"] == "subject"
    assert max(f["layer_scores"], key=lambda s: s["score"])["layer"] == planted.head[0]
    assert all(s["index"] != 0 for s in f["token_scores"])
    assert "attention sink" in result.summary and "Position 0" in result.summary


def test_subject_only_at_a_sink_falls_back_to_content_tokens(sink_planted):
    sample = km.Sample(prompt=sink_planted.sample["prompt"], ground_truth=" Paris", triple_subject="Eiffel")
    result = run(sink_planted.model, sample)
    assert result.findings["sinks"] == [0] and result.findings["head_score_basis"] == "content tokens"
    assert "only tokens are sinks" in result.summary


def test_attention_sinks_on_synthetic_patterns():
    n = 8
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    assert attention_sinks([uniform[None].repeat(4, 1, 1)], "causal")[0] == []
    sink = 0.1 * uniform
    sink[:, 0] += 0.9
    heads = torch.stack([sink, sink, sink, uniform])  # a sink in 3 of 4 heads
    found, share = attention_sinks([heads], "causal")
    assert found == [0] and share[0] == 0.75
    assert attention_sinks([torch.stack([sink, uniform, uniform, uniform])], "causal")[0] == []  # not in most heads
    last = torch.full((n, n), 0.1 / (n - 1))
    last[:, -1] = 0.9  # bidirectional: every query parks on the last position ([SEP])
    assert attention_sinks([last[None].repeat(2, 1, 1)], "masked")[0] == [n - 1]


@pytest.mark.smollm2
def test_smollm2_heads_read_the_subject(smollm2):
    before = smollm2.hf_model.config._attn_implementation
    f = run(smollm2, FACT).findings
    assert smollm2.hf_model.config._attn_implementation == before
    assert f["heads"][0]["score"] > 0.5
    assert f["heads"][0]["layer"] > 0


KNOWN_1000 = Path("/work/shared/data/known_1000/known_1000.json")


def known_facts(prompts):
    """known_1000 records (real data) by prompt; skipped where the data is not there."""
    if not KNOWN_1000.is_file():
        pytest.skip(f"needs {KNOWN_1000}")
    by_prompt = {s["prompt"]: s for s in km.load_dataset("known_1000", path=str(KNOWN_1000))}
    return [by_prompt[p] for p in prompts]


@pytest.mark.smollm2
def test_smollm2_sink_is_not_the_headline_on_known_facts(smollm2):
    """SmolLM2 adds no BOS token: position 0 (here the subject's first token) is a sink, and with it counted as
    subject attention, head 18.8 (which only parks there) used to be the headline with 1.00."""
    for sample in known_facts(["Catalonia belongs to the continent of", "Ibn Khaldun follows the religion of"]):
        result = run(smollm2, sample)
        f = result.findings
        assert f["sinks"] == [0] and f["subject_span"]["start"] == 0 and f["head_score_basis"] == "subject"
        per_head = torch.tensor(f["last_token_attention_per_head"])
        top = f["heads"][0]
        beyond = per_head[top["layer"], top["head"], 1:f["subject_span"]["stop"]].sum()
        assert top["score"] == pytest.approx(float(beyond), abs=1e-5) and top["score"] > 0.5
        assert per_head[top["layer"], top["head"], 0] < 0.5
        assert "attention sink" in result.summary
