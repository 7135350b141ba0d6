"""The planted-fact models carry their fact by exactly the planted route."""

from __future__ import annotations

import pytest
import torch

from knowmri.hooks import Hooks
from knowmri.testing import Planted, build_planted


def answer_prob(p: Planted, prompt: str | None = None, edit=None) -> float:
    model = p.model
    enc = model.encode(prompt or p.sample["prompt"])
    with torch.no_grad(), Hooks(model) as h:
        if edit is not None:
            edit(h)
        logits = model.forward(**enc.inputs())
    return float(logits[0, enc.last].softmax(-1)[p.answer_id])


def test_predicts_answer(planted: Planted) -> None:
    top = planted.model.predict(planted.sample["prompt"], top_k=1)[0]
    assert top[0] == planted.sample["ground_truth"]
    assert top[1] > 0.5
    assert answer_prob(planted) > 0.5
    assert planted.model.tokenizer.decode([planted.answer_id]) == " Paris"


def test_facts_are_consistent(planted: Planted) -> None:
    model, sample = planted.model, planted.sample
    assert planted.neuron_position == planted.subject_span.stop - 1
    assert model.token_span(sample["prompt"], sample["triple_subject"]) == planted.subject_span
    other = planted.other_sample
    assert other["prompt"] != sample["prompt"]
    assert len(model.token_span(other["prompt"], other["triple_subject"])) == len(planted.subject_span)
    assert len(model.encode(other["prompt"]).input_ids[0]) == len(model.encode(sample["prompt"]).input_ids[0])
    assert planted.last_position == model.encode(sample["prompt"]).last
    assert 0 <= planted.neuron[0] < planted.head[0] < model.n_layers


def test_neuron_fires_only_on_subject(planted: Planted) -> None:
    model = planted.model
    layer, unit = planted.neuron
    enc = model.encode(planted.sample["prompt"])
    with torch.no_grad(), Hooks(model) as h:
        cap = h.read(f"blocks.{layer}.mlp.neurons")
        model.forward(**enc.inputs())
    acts = cap.value[0]
    assert int(acts[:, unit].abs().argmax()) == planted.neuron_position
    assert int(acts[planted.neuron_position].abs().argmax()) == unit
    assert acts[planted.neuron_position, unit].abs() > 10 * acts[:, :unit].abs().max()


def test_ablating_planted_neuron_kills_fact(planted: Planted) -> None:
    clean = answer_prob(planted)
    layer, unit = planted.neuron
    ablated = answer_prob(planted, edit=lambda h: h.ablate(f"blocks.{layer}.mlp.neurons", units=[unit]))
    assert ablated < 0.2 * clean
    at_subject = answer_prob(planted, edit=lambda h: h.ablate(f"blocks.{layer}.mlp.neurons", units=[unit],
                                                              positions=[planted.neuron_position]))
    assert at_subject < 0.2 * clean
    rng = torch.Generator().manual_seed(1)
    others = [u for u in torch.randperm(planted.model.d_mlp, generator=rng).tolist() if u != unit][:5]
    for u in others:
        kept = answer_prob(planted, edit=lambda h, u=u: h.ablate(f"blocks.{layer}.mlp.neurons", units=[u]))
        assert kept > 0.9 * clean


def test_ablating_planted_head_kills_fact(planted: Planted) -> None:
    clean = answer_prob(planted)
    layer, head = planted.head
    ablated = answer_prob(planted, edit=lambda h: h.ablate(f"blocks.{layer}.attn.heads", units=[head]))
    assert ablated < 0.2 * clean
    for other_layer in range(planted.model.n_layers):
        for other in range(planted.model.n_heads):
            if (other_layer, other) == planted.head:
                continue
            kept = answer_prob(planted, edit=lambda h, a=other_layer, b=other: h.ablate(f"blocks.{a}.attn.heads", units=[b]))
            assert kept > 0.9 * clean


def test_head_attends_to_subject(planted: Planted) -> None:
    model = planted.model
    layer, head = planted.head
    enc = model.encode(planted.sample["prompt"])
    with torch.no_grad():
        out = model.hf_model(**enc.inputs(), output_attentions=True, use_cache=False)
    pattern = out.attentions[layer][0, head, enc.last]
    assert int(pattern.argmax()) == planted.neuron_position
    assert float(pattern[planted.neuron_position]) > 0.9


def test_other_subject_gives_other_answer(planted: Planted) -> None:
    top = planted.model.predict(planted.other_sample["prompt"], top_k=1)[0]
    assert top[0] == planted.other_sample["ground_truth"] != planted.sample["ground_truth"]
    assert top[1] > 0.5
    assert answer_prob(planted, planted.other_sample["prompt"]) < 0.01


def test_patching_subject_state_restores_fact(planted: Planted) -> None:
    """Causal-tracing ground truth: the clean subject state after the neuron restores the answer."""
    model = planted.model
    clean = model.encode(planted.sample["prompt"])
    layer = planted.neuron[0]
    with torch.no_grad(), Hooks(model) as h:
        cap = h.read(f"blocks.{layer}.resid_post")
        model.forward(**clean.inputs())
    patched = answer_prob(planted, planted.other_sample["prompt"], edit=lambda h: h.replace(
        f"blocks.{layer}.resid_post", cap.value[:, planted.neuron_position], positions=[planted.neuron_position]))
    assert patched > 0.5


def test_logit_lens_answer_layer(planted: Planted) -> None:
    model = planted.model
    enc = model.encode(planted.sample["prompt"])
    with torch.no_grad(), Hooks(model) as h:
        caps = [h.read(f"blocks.{layer}.resid_post") for layer in range(model.n_layers)]
        model.forward(**enc.inputs())
        top = [int(model.readout(c.value[0, enc.last]).argmax()) for c in caps]
    assert planted.answer_layer == planted.head[0]
    assert all(t != planted.answer_id for t in top[: planted.answer_layer])
    assert all(t == planted.answer_id for t in top[planted.answer_layer:])


def test_unknown_style() -> None:
    with pytest.raises(ValueError, match="unknown planted style"):
        build_planted("bert")
