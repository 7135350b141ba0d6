"""The planted-fact models carry their fact by exactly the planted route: "enrich" (the `planted`
fixture: a subject neuron, then a head) and "recall" (a head copies the subject, then a neuron at
the last position writes the answer)."""

from __future__ import annotations

import pytest
import torch

from knowmri.hooks import Hooks
from knowmri.testing import Planted, build_planted, planted_model
from knowmri.testing.planted import STYLES


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
    with pytest.raises(ValueError, match="unknown planted variant"):
        build_planted("gpt2", variant="lookup")


@pytest.fixture(params=STYLES, ids=list(STYLES))
def recall(request: pytest.FixtureRequest) -> Planted:
    """The "recall" variant: head (subject -> last position), then a neuron at the last position."""
    return planted_model(request.param, variant="recall")


def test_recall_predicts_answer_and_other_answer(recall: Planted) -> None:
    assert answer_prob(recall) > 0.5
    top = recall.model.predict(recall.other_sample["prompt"], top_k=1)[0]
    assert top[0] == recall.other_sample["ground_truth"] != recall.sample["ground_truth"] and top[1] > 0.5
    assert answer_prob(recall, recall.other_sample["prompt"]) < 0.01


def test_recall_facts_are_consistent(recall: Planted) -> None:
    model = recall.model
    assert recall.variant == "recall" and recall.model.name.endswith("-recall")
    assert recall.neuron_position == recall.last_position == model.encode(recall.sample["prompt"]).last
    assert 0 <= recall.head[0] < recall.neuron[0] < model.n_layers
    assert recall.other_neuron[0] == recall.neuron[0] and recall.other_neuron != recall.neuron
    assert recall.subject_span == model.token_span(recall.sample["prompt"], recall.sample["triple_subject"])


@pytest.mark.parametrize("style", STYLES)
def test_cache_is_keyed_by_style_and_variant(style: str) -> None:
    enrich, recall = planted_model(style), planted_model(style, variant="recall")
    assert planted_model(style, variant="enrich") is enrich and planted_model(style, variant="recall") is recall
    assert enrich.variant == "enrich" and recall.variant == "recall" and enrich.model is not recall.model
    assert recall.sample == enrich.sample and recall.other_sample == enrich.other_sample
    assert recall.model.tokenizer.get_vocab() == enrich.model.tokenizer.get_vocab()
    assert (recall.answer_id, recall.other_answer_id) == (enrich.answer_id, enrich.other_answer_id)


def test_recall_neuron_fires_only_at_last_position_and_writes_answer(recall: Planted) -> None:
    model = recall.model
    layer, unit = recall.neuron
    enc = model.encode(recall.sample["prompt"])
    with torch.no_grad(), Hooks(model) as h:
        cap = h.read(f"blocks.{layer}.mlp.neurons")
        model.forward(**enc.inputs())
    acts = cap.value[0]
    assert int(acts[:, unit].abs().argmax()) == recall.neuron_position
    assert int(acts[recall.neuron_position].abs().argmax()) == unit
    assert acts[recall.neuron_position, unit] > 10 * acts[: recall.neuron_position, unit].abs().max()
    with torch.no_grad():
        logits = model.unembedding @ model.mlp_value_vectors(layer)[unit]
        assert int(logits.argmax()) == recall.answer_id
        other = model.unembedding @ model.mlp_value_vectors(layer)[recall.other_neuron[1]]
        assert int(other.argmax()) == recall.other_answer_id


def test_recall_ablations(recall: Planted) -> None:
    clean = answer_prob(recall)
    layer, unit = recall.neuron
    neurons = f"blocks.{layer}.mlp.neurons"
    assert answer_prob(recall, edit=lambda h: h.ablate(neurons, units=[unit])) < 0.2 * clean
    assert answer_prob(recall, edit=lambda h: h.ablate(neurons, units=[unit], positions=[recall.last_position])) < 0.2 * clean
    rng = torch.Generator().manual_seed(1)
    for u in [u for u in torch.randperm(recall.model.d_mlp, generator=rng).tolist() if u != unit][:5]:
        assert answer_prob(recall, edit=lambda h, u=u: h.ablate(neurons, units=[u])) > 0.9 * clean
    head_layer, head = recall.head
    assert answer_prob(recall, edit=lambda h: h.ablate(f"blocks.{head_layer}.attn.heads", units=[head])) < 0.2 * clean
    for a in range(recall.model.n_layers):
        for b in range(recall.model.n_heads):
            if (a, b) != recall.head:
                kept = answer_prob(recall, edit=lambda h, a=a, b=b: h.ablate(f"blocks.{a}.attn.heads", units=[b]))
                assert kept > 0.9 * clean


def test_recall_head_attends_to_subject(recall: Planted) -> None:
    layer, head = recall.head
    enc = recall.model.encode(recall.sample["prompt"])
    with torch.no_grad():
        out = recall.model.hf_model(**enc.inputs(), output_attentions=True, use_cache=False)
    pattern = out.attentions[layer][0, head, enc.last]
    subject_last = recall.subject_span.stop - 1
    assert int(pattern.argmax()) == subject_last and float(pattern[subject_last]) > 0.9


def test_recall_logit_lens_answer_layer(recall: Planted) -> None:
    model = recall.model
    enc = model.encode(recall.sample["prompt"])
    with torch.no_grad(), Hooks(model) as h:
        caps = [h.read(f"blocks.{layer}.resid_post") for layer in range(model.n_layers)]
        model.forward(**enc.inputs())
        top = [int(model.readout(c.value[0, enc.last]).argmax()) for c in caps]
    assert recall.answer_layer == recall.neuron[0]
    assert all(t != recall.answer_id for t in top[: recall.answer_layer])
    assert all(t == recall.answer_id for t in top[recall.answer_layer:])


@pytest.mark.parametrize("style", STYLES)
def test_generic_neuron_fires_everywhere_beside_the_fact_neuron(style: str) -> None:
    """The "generic" variant: the recall mechanism plus a unit that fires at every position of any prompt."""
    generic = planted_model(style, variant="generic")
    model = generic.model
    assert generic.generic_neuron is not None and generic.generic_neuron != generic.neuron
    assert model.predict(generic.sample["prompt"], top_k=1)[0][0] == " Paris"
    layer, unit = generic.generic_neuron
    for prompt in (generic.sample["prompt"], "The capital of Japan is"):
        enc = model.encode(prompt)
        with torch.no_grad(), Hooks(model) as h:
            cap = h.read(f"blocks.{layer}.mlp.neurons")
            model.forward(**enc.inputs())
        assert (cap.value[0, :, unit] > 1.0).all()
    assert planted_model(style).generic_neuron is None
