"""fine: a neuron that writes the answer directly ranks first (added to a planted model, or the
"recall" variant's planted one), contributions add up to each MLP's direct effect on the answer
logit, multi-token answers, every family, and SmolLM2's Eiffel Tower."""

from __future__ import annotations

import json

import pytest
import torch

from knowmri.hooks import Hooks, site
from knowmri.methods import neuron_readouts as nr
from knowmri.methods.base import RunContext, get_method
from knowmri.sample import Sample
from knowmri.testing import build_planted, build_tiny, planted_model, tiny_model

PROMPT = "The Eiffel Tower is located in the city of"


def run(model, sample, **params):
    method = get_method("fine")
    return method.run(model, sample, method.Params.from_dict(params), RunContext())


def _token(model, text: str) -> int:
    (tid,) = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return tid


@torch.no_grad()
def _add_direct_writer(planted, unit: int) -> tuple[int, int]:
    """Plant a last-layer neuron that fires on " of" (the last token) and writes the answer's
    unembedding direction: a neuron with a direct effect, which is what FiNE measures."""
    model = planted.model
    layer = model.n_layers - 1
    relation = model.embed_module.weight[_token(model, " of")]
    paris = _token(model, " Paris")
    answer = (model.unembedding[paris] - 0.5 * model.embed_module.weight[paris]) / 2  # the planted answer direction
    w_in = model.linear_weight(model.component(layer, "mlp_in"))
    w_down = model.linear_weight(model.component(layer, "mlp_down"))
    w_in[unit] = relation
    if model.spec.gated:
        model.linear_weight(model.component(layer, "mlp_gate"))[unit] = relation
    w_down[:, unit] = answer
    return layer, unit


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_planted_direct_writer_ranks_first(style) -> None:
    planted = build_planted(style)
    neuron = _add_direct_writer(planted, unit=5)
    result = run(planted.model, planted.sample, top_k=10)
    first = result.findings["neurons"][0]
    assert (first["layer"], first["unit"]) == neuron
    assert first["top_tokens"][0].strip() == "Paris"


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_recall_neuron_ranks_first_at_default_settings(style) -> None:
    """In the "recall" planted model a neuron at the last position writes the answer directly (after
    a head copied the subject there): FiNE's default score ranks it first, by far."""
    planted = planted_model(style, variant="recall")
    result = run(planted.model, planted.sample)
    f = result.findings
    first = f["neurons"][0]
    assert (first["layer"], first["unit"]) == planted.neuron
    assert first["top_tokens"][0].strip() == "Paris"
    assert f["tokens"][0]["position"] == planted.neuron_position
    assert first["score"] > 10 * max(abs(n["score"]) for n in f["neurons"][1:])
    assert max(f["layer_scores"], key=lambda s: s["score"])["layer"] == planted.neuron[0]


def test_planted_subject_neuron_has_no_direct_effect(planted) -> None:
    """The planted subject neuron writes a feature that an attention head turns into the answer:
    its effect is indirect, so FiNE (a direct-effect score at the predicting position) gives it ~0."""
    result = run(planted.model, planted.sample, top_k=5)
    contributions = torch.as_tensor(result.arrays["contributions"])
    assert abs(float(contributions[planted.neuron])) < 1e-3
    assert result.findings["neurons"][0]["score"] > 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "opt", "bloom", "falcon"])
def test_contributions_add_up_to_each_mlps_direct_logit(family) -> None:
    model = tiny_model(family)
    enc = model.encode(PROMPT, " Paris")
    position, token = enc.target_positions[0], enc.target_ids[0]
    result = run(model, Sample(prompt=PROMPT, ground_truth=" Paris"))
    contributions = torch.as_tensor(result.arrays["contributions"])
    with torch.no_grad(), Hooks(model) as h:
        outs = [h.read(site(layer, "mlp.out"), positions=[position]) for layer in range(model.n_layers)]
        model.forward(**enc.inputs())
    u = model.unembedding[token].detach().float()
    for layer, cap in enumerate(outs):
        bias = getattr(model.component(layer, "mlp_down"), "bias", None)
        direct = cap.value[0, 0].float() - (bias.detach().float() if bias is not None else 0.0)
        assert float(contributions[layer].sum()) == pytest.approx(float(direct @ u), rel=1e-4, abs=1e-5)
        assert result.findings["layer_scores"][layer]["score"] == pytest.approx(float(direct @ u), rel=1e-4, abs=1e-5)


def test_multi_token_answer_sums_each_token_at_its_own_position(tiny) -> None:
    model = tiny("llama")
    enc = model.encode(PROMPT, " Paris France")
    pairs = nr.answer_tokens(model, enc)
    assert len(pairs) == 2 and int(enc.input_ids[0, pairs[1][0]]) == pairs[0][1]  # teacher forced
    result = run(model, Sample(prompt=PROMPT, ground_truth=" Paris France"))
    assert [t["position"] for t in result.findings["tokens"]] == [p for p, _ in pairs]
    expected = torch.zeros(model.n_layers, model.d_mlp)
    for position, token in pairs:
        clean, _ = nr.clean_neurons(model, enc, [position])
        for layer in range(model.n_layers):
            value = model.mlp_value_vectors(layer).detach() @ model.unembedding[token].detach()
            expected[layer] += clean[layer][0] * value
    torch.testing.assert_close(torch.as_tensor(result.arrays["contributions"]), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
def test_token_probability_is_read_at_its_predicting_position(family) -> None:
    model = tiny_model(family)
    enc = model.encode(PROMPT, " Paris France")
    with torch.no_grad():
        probs = model.forward(**enc.inputs())[0].float().softmax(-1)
    result = run(model, Sample(prompt=PROMPT, ground_truth=" Paris France"))
    tokens = result.findings["tokens"]
    assert len(tokens) == len(nr.answer_tokens(model, enc))
    for (position, token), found in zip(nr.answer_tokens(model, enc), tokens):
        assert found["position"] == position
        assert found["probability"] == pytest.approx(float(probs[position, token]), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_final_norm_gain(family) -> None:
    model = build_tiny(family)
    with torch.no_grad():
        model.final_norm.weight.copy_(torch.rand(model.d_model) + 0.5)
    gain = nr.final_norm_gain(model)
    expected = model.final_norm.weight + 1.0 if family == "gemma" else model.final_norm.weight
    torch.testing.assert_close(gain, expected.detach().float(), rtol=1e-4, atol=1e-4)
    plain = run(model, Sample(prompt=PROMPT, ground_truth=" Paris"))
    normed = run(model, Sample(prompt=PROMPT, ground_truth=" Paris"), use_final_norm=True)
    assert not torch.allclose(torch.as_tensor(plain.arrays["contributions"]), torch.as_tensor(normed.arrays["contributions"]))


def test_runs_on_every_family(tiny_family_model) -> None:
    model = tiny_family_model
    result = run(model, Sample(prompt=PROMPT, ground_truth=" Paris"), top_k=8)
    f = result.findings
    assert result.summary and len(result.figures) == 2 and result.tables[0]["rows"]
    assert len(f["neurons"]) == 8 and len(f["layer_scores"]) == model.n_layers
    scores = [n["score"] for n in f["neurons"]]
    assert scores == sorted(scores, reverse=True)
    assert all(len(n["top_tokens"]) == 5 for n in f["neurons"])
    json.dumps(result.to_dict())


def test_params_are_validated() -> None:
    params = get_method("fine").Params
    assert params().use_final_norm is False
    for bad in ({"top_k": 0}, {"top_tokens": 0}, {"max_answer_tokens": 0}):
        with pytest.raises(ValueError):
            params.from_dict(bad)


@pytest.mark.smollm2
def test_smollm2_eiffel_tower(smollm2) -> None:
    result = run(smollm2, Sample(prompt=PROMPT, ground_truth=" Paris"), top_k=10)
    f = result.findings
    scores = [n["score"] for n in f["neurons"]]
    assert len(scores) == 10 and scores == sorted(scores, reverse=True) and scores[0] > 0
    enc = smollm2.encode(PROMPT, " Paris")
    answer, pos = enc.target_ids[0], enc.pred_pos

    def logit(ablate=()) -> float:
        with torch.no_grad(), Hooks(smollm2) as h:
            for layer, unit in ablate:
                h.ablate(site(layer, "mlp.neurons"), positions=[pos], units=[unit])
            return float(smollm2.forward(**enc.inputs())[0, pos, answer])

    top5 = [(n["layer"], n["unit"]) for n in f["neurons"][:5]]
    clean = logit()
    gen = torch.Generator().manual_seed(0)
    random_drops = [clean - logit([(layer, int(torch.randint(smollm2.d_mlp, (1,), generator=gen))) for layer, _ in top5])
                    for _ in range(3)]
    assert clean - logit(top5) > max(random_drops)
