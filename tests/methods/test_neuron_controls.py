"""Controls of neuron localisations: on the planted model with a generic neuron beside the fact's,
knowledge neurons and FiNE rank the fact neuron, flag the generic one (shown apart, never headlined,
left out of the located set unless kept) and specificity separates them; the causal verification says
which located sets hold up against unrelated facts and random units; warnings for a fact the model does
not know and for too few controls; paraphrases refine the set; and a few SmolLM2 checks on real
known_1000 facts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import knowmri as km
from knowmri.methods import neuron_controls as nc
from knowmri.methods.base import RunContext, get_method, unregister_method
from knowmri.sample import Sample
from knowmri.testing import planted_model

KNOWN_1000 = Path("/work/shared/data/known_1000/known_1000.json")


def run(method: str, model: Any, sample: Any, **params: Any) -> Any:
    m = get_method(method)
    return m.run(model, sample, m.Params.from_dict(params), RunContext())


@pytest.fixture(params=["gpt2", "llama"])
def generic(request: pytest.FixtureRequest) -> Any:
    """The planted model whose fact neuron has a generic neuron beside it."""
    return planted_model(request.param, variant="generic")


def keys(neurons: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(n["layer"], n["unit"]) for n in neurons]


def test_the_generic_neuron_matters_to_every_fact_the_fact_neuron_to_its_own(generic) -> None:
    fact = nc.encode_prompt(generic.model, generic.sample["prompt"], " Paris")
    controls = nc.control_prompts(generic.model, generic.sample, 8)
    assert len(controls) == 8 and all("Eiffel" not in c.text for c in controls)
    fact_neuron, generic_neuron = nc.screen(generic.model, fact, controls, [generic.neuron, generic.generic_neuron])
    assert fact_neuron["effect"] < -0.5 and abs(fact_neuron["control_effect"]) < 0.05 and not fact_neuron["generic"]
    assert generic_neuron["effect"] < -0.5 and generic_neuron["control_effect"] < -0.5 and generic_neuron["generic"]



@pytest.mark.parametrize("family", ["gpt2", "llama", "falcon"])
def test_edits_replayed_from_their_first_layer_equal_whole_forwards(family) -> None:
    from knowmri.testing import tiny_model

    model = tiny_model(family)
    sample = Sample(prompt="The Eiffel Tower is located in the city of", ground_truth=" Paris")
    fact = nc.encode_prompt(model, sample["prompt"], " Paris")
    prompts = [fact, *nc.control_prompts(model, sample, 3)]
    last = model.n_layers - 1
    edits = [nc.neuron_edit([(last, 3)], 0.0), nc.neuron_edit([(0, 5)], 0.0), nc.neuron_edit([(1, 2), (last, 7)], 2.0), {}]
    rows = [(i, edit) for edit in edits for i in range(len(prompts))][::-1]  # mixed order, unedited rows included
    whole = nc.answer_probs(model, prompts, rows, replay=False)
    assert nc.answer_probs(model, prompts, rows) == pytest.approx(whole, rel=1e-4, abs=1e-7)
    replayed = nc.replayed_probs(model, prompts, rows)
    assert replayed is None or replayed == pytest.approx(whole, rel=1e-4, abs=1e-7)

def test_knowledge_neurons_rank_the_fact_neuron_and_flag_the_generic_one(generic) -> None:
    result = run("knowledge_neurons", generic.model, generic.sample, steps=8)
    f = result.findings
    assert keys(f["neurons"])[0] == generic.neuron
    assert generic.generic_neuron not in keys(f["neurons"])
    flagged = {(n["layer"], n["unit"]): n for n in f["generic_neurons"]}
    assert flagged[generic.generic_neuron]["generic"] is True
    assert flagged[generic.generic_neuron]["control_effect"] < -0.5
    # without the screen the generic neuron would be located: its attribution is as large as the fact neuron's
    top = {(n["layer"], n["unit"]): n["score"] for n in f["top_neurons"]}
    assert top[generic.generic_neuron] > 0.2 * top[generic.neuron]
    layer, unit = generic.neuron
    assert f"neuron {unit} of layer {layer}" in result.summary and "generic neuron(s)" in result.summary
    assert [t for t in result.tables if t["name"].startswith("Generic neurons")]
    kept = run("knowledge_neurons", generic.model, generic.sample, steps=8, keep_generic=True).findings
    assert {n["generic"] for n in kept["neurons"] if (n["layer"], n["unit"]) == generic.generic_neuron} == {True}


def test_fine_never_headlines_the_generic_neuron(generic) -> None:
    result = run("fine", generic.model, generic.sample)
    f = result.findings
    assert keys(f["neurons"])[0] == generic.neuron
    assert generic.generic_neuron in keys(f["generic_neurons"]) and generic.generic_neuron not in keys(f["neurons"])
    layer, unit = generic.neuron
    assert f"is neuron {unit} of layer {layer}" in result.summary
    assert run("fine", generic.model, generic.sample, controls=0).findings["generic_neurons"] == []


def test_specificity_separates_the_fact_neuron_from_the_generic_one(generic) -> None:
    fact = nc.encode_prompt(generic.model, generic.sample["prompt"], " Paris")
    controls = nc.control_prompts(generic.model, generic.sample, 8)
    checks = nc.specificities(generic.model, fact, controls, {"fact": [generic.neuron], "generic": [generic.generic_neuron]})
    assert checks["fact"]["holds"] and not checks["generic"]["holds"]
    assert checks["fact"]["specificity"] > 0.5 > checks["generic"]["specificity"]
    assert "own_amplified" in checks["fact"] and checks["fact"]["random_draws"] == 5
    assert checks["generic"]["control"] < -0.5 and checks["fact"]["n_controls"] == 8


@pytest.fixture
def claims_generic(generic) -> Iterator[str]:
    """A plug-in method that locates the generic neuron (without flagging it)."""
    from tests.analysis.test_consensus import plug_in

    layer, unit = generic.generic_neuron
    plug_in("claims_generic_test", lambda model, sample: {"neurons": [{"layer": layer, "unit": unit, "score": 1.0}]})
    yield "claims_generic_test"
    unregister_method("claims_generic_test")


def test_verification_says_which_localisation_holds_up(generic, claims_generic) -> None:
    report = km.diagnose(generic.sample, generic.model, methods=["knowledge_neurons", claims_generic],
                         params={"knowledge_neurons": {"steps": 8}}, progress=False)
    v = report.consensus["verification"]
    kn_check, plug = v["methods"]["knowledge_neurons"], v["methods"][claims_generic]
    assert kn_check["holds"] and not plug["holds"]
    assert plug["control"] < -0.5 and abs(kn_check["control"]) < 0.1 and v["n_controls"] == 8
    assert {"own", "control", "random", "random_std", "specificity", "own_amplified"} <= set(kn_check)
    assert "unrelated facts" in report.consensus["verdict"] and "does not hold up" in report.consensus["verdict"]


def test_an_unknown_fact_and_too_few_controls_are_warned_about(generic) -> None:
    unknown = Sample(prompt=generic.sample["prompt"], ground_truth=" Rome", triple_subject="Eiffel Tower")
    f = run("fine", generic.model, unknown, controls=2).findings
    assert any("does not know" in w for w in f["warnings"]) and any("only 2" in w for w in f["warnings"])
    result = run("knowledge_neurons", generic.model, unknown, steps=4, controls=2)
    assert "does not know" in result.summary and "only 2 unrelated" in result.summary
    assert "unrefined single-prompt attribution" in result.summary


def test_paraphrases_the_model_answers_refine_the_set(generic) -> None:
    sample = generic.sample.replace(relation_id="P131")
    params = {"steps": 4, "paraphrase_floor": 0.0}
    f = run("knowledge_neurons", generic.model, sample, **params).findings
    assert f["n_prompts"] == 3 and len(f["paraphrases"]) == 2 and all("Eiffel Tower" in p for p in f["paraphrases"])
    assert [d["paraphrase"] for d in f["prompts"]] == [False, True, True]
    assert run("knowledge_neurons", generic.model, sample, steps=4, paraphrase_floor=1.0).findings["n_prompts"] == 1


# --- SmolLM2 on real known_1000 facts ------------------------------------------------------------

def known_facts(n: int) -> list[Sample]:
    if not KNOWN_1000.is_file():
        pytest.skip(f"{KNOWN_1000} is missing")
    records = json.loads(KNOWN_1000.read_text())
    return [Sample(prompt=r["prompt"], ground_truth=" " + r["attribute"].strip(), triple_subject=r["subject"],
                   relation_id=r["relation_id"]) for r in records[:n]]


@pytest.mark.smollm2
def test_smollm2_the_sink_neuron_is_flagged_generic_not_located(smollm2) -> None:
    """Layer 0's unit 767 tops the raw attribution of many facts; the screen flags it and it is never located."""
    sample = known_facts(1)[0]
    f = run("knowledge_neurons", smollm2, sample, steps=4, paraphrases=0).findings
    assert (0, 767) not in keys(f["neurons"])
    assert all(n["generic"] for n in f["generic_neurons"]) and f["controls"]
    assert all(not n.get("generic") for n in f["neurons"])


@pytest.mark.smollm2
def test_smollm2_located_neurons_are_specific_to_their_fact(smollm2) -> None:
    sample = known_facts(1)[0]
    report = km.diagnose(sample, smollm2, methods=["fine"], progress=False)
    check = report.consensus["verification"]["methods"]["fine"]
    assert check["n_controls"] == 8 and check["random_draws"] == 5
    assert check["own"] < check["control"] and check["own"] < check["random"]
