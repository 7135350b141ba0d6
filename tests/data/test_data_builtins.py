"""Built-in datasets: every one loads offline with its keys, and its content is right."""

from __future__ import annotations

import re

import pytest

from knowmri.data import Dataset, datasets, load_dataset
from knowmri.data.dataset import DatasetSpec, get_spec, register
from knowmri.data.formats_tasks import EMOTION_LABELS, IMDB_LABELS
from knowmri.sample import KEYS, Sample

NAMES = ["known_1000", "counterfact", "zsre", "pararel", "pep3k", "twenty_q", "concept_edit", "bias_neurons",
         "gsm8k", "metamath", "imdb", "emotion", "opus_books", "opus_100", "mbpp"]
FACT_SETS = ["known_1000", "counterfact", "zsre", "pararel", "concept_edit", "pep3k", "twenty_q"]
EQUATION = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?(?:\s*[-+*/]\s*\d+(?:\.\d+)?)+)\s*=\s*\$?(\d+(?:\.\d+)?)")


def test_datasets_lists_all_fifteen_with_keys_and_sizes():
    listing = datasets()
    assert [d["name"] for d in listing] == NAMES
    for entry in listing:
        assert entry["description"] and entry["source"] and entry["formats"]
        assert entry["size"] >= 50
        assert entry["keys"] and all(k in KEYS for k in entry["keys"])
        assert entry["keys"][0] == "prompt"


@pytest.mark.parametrize("name", NAMES)
def test_builtin_loads_offline_with_its_support_keys(name):
    ds = load_dataset(name)
    spec = get_spec(name)
    assert isinstance(ds, Dataset) and ds.name == name and ds.origin == "built-in"
    assert len(ds) >= 50
    assert set(ds.support_keys) == set(spec.support_keys)
    assert ds.description == spec.description and ds.citation == spec.source
    for sample in ds:
        assert isinstance(sample, Sample)
        for key in spec.support_keys:
            assert sample.get(key), (name, key, sample)


@pytest.mark.parametrize("name", NAMES)
def test_builtin_prompts_are_unique_and_answers_are_continuations(name):
    ds = load_dataset(name)
    prompts = [s["prompt"] for s in ds]
    if name != "bias_neurons":  # the same probe is asked once per demographic
        assert len(set(prompts)) == len(prompts)
    for s in ds:
        assert s["ground_truth"].startswith(" ") or name == "mbpp"
        assert s["ground_truth"].strip()


def test_eiffel_tower_is_record_zero_of_known_1000_and_counterfact():
    for name in ("known_1000", "counterfact"):
        s = load_dataset(name)[0]
        assert s["prompt"] == "The Eiffel Tower is located in the city of"
        assert s["ground_truth"] == " Paris"
        assert s["triple_subject"] == "Eiffel Tower"
        assert s["triple_object"] == "Paris"
    assert load_dataset("counterfact")[0]["target_new"] == " Rome"


@pytest.mark.parametrize("name", FACT_SETS)
def test_fact_subjects_occur_in_prompts_and_objects_match(name):
    for s in load_dataset(name):
        assert s["triple_subject"] in s["prompt"]
        if name not in ("pep3k", "twenty_q"):
            assert s["ground_truth"] == " " + s["triple_object"]


def test_counterfact_targets_are_false_objects_of_the_same_relation():
    ds = load_dataset("counterfact")
    objects_by_relation: dict[str, set[str]] = {}
    for s in ds:
        objects_by_relation.setdefault(s["triple_relation"], set()).add(s["triple_object"])
    for s in ds:
        assert s["target_new"] != s["ground_truth"]
        assert s["target_new"].strip() in objects_by_relation[s["triple_relation"]]


def test_pararel_and_zsre_carry_several_phrasings():
    for name in ("pararel", "zsre"):
        for s in load_dataset(name):
            assert len(s["prompts"]) >= 2 and s["prompt"] == s["prompts"][0]
            assert all(s["triple_subject"] in p for p in s["prompts"])
    assert all(s["prompt"].endswith("?") for s in load_dataset("zsre"))


def test_classification_labels_are_in_their_label_sets():
    sets = {"pep3k": {"True", "False"}, "twenty_q": {"True", "False"}, "imdb": set(IMDB_LABELS),
            "emotion": set(EMOTION_LABELS), "bias_neurons": {"female", "male", "young", "old", "rich", "poor"}}
    for name, labels in sets.items():
        ds = load_dataset(name)
        seen = {s["label"] for s in ds}
        assert seen == labels, name
        assert all(s["ground_truth"] == " " + s["label"] for s in ds)
    assert all("[MASK]" in s["prompt"] for s in load_dataset("bias_neurons"))


@pytest.mark.parametrize("name", ["gsm8k", "metamath"])
def test_math_answers_equal_the_worked_solutions(name):
    for s in load_dataset(name):
        equations = EQUATION.findall(s["reasoning"])
        assert equations, s["reasoning"]
        for expression, result in equations:
            assert eval(expression) == pytest.approx(float(result)), (expression, result)  # noqa: S307
        assert float(equations[-1][1]) == float(s["ground_truth"])
        if name == "metamath":
            assert s["reasoning"].endswith(f"The answer is: {s['ground_truth'].strip()}")


def test_mbpp_reference_code_passes_its_asserts():
    for s in load_dataset("mbpp"):
        namespace: dict = {}
        exec(s["ground_truth"], namespace)  # noqa: S102
        assert len(s["tests"]) >= 3
        for test in s["tests"]:
            exec(test, namespace)  # noqa: S102
        assert s["tests"][0] in s["prompt"]


@pytest.mark.parametrize("name", ["opus_books", "opus_100"])
def test_translation_pairs(name):
    ds = load_dataset(name)
    for s in ds:
        assert s["source_lang"] == "en" and s["target_lang"] in {"fr", "de", "es"}
        assert s["prompt"].startswith("Translate English to ") and s["prompt"].endswith(":")
        source = s["prompt"].split("\nEnglish: ", 1)[1].rsplit("\n", 1)[0]
        assert source.strip() and s["ground_truth"].strip() != source.strip()
    if name == "opus_100":
        assert {s["target_lang"] for s in ds} == {"fr", "de", "es"}


def test_dataset_indexing_slicing_iteration_and_limit():
    ds = load_dataset("known_1000")
    assert ds[-1] == ds[len(ds) - 1]
    with pytest.raises(IndexError, match="out of range for dataset 'known_1000'"):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds[-len(ds) - 1]
    with pytest.raises(TypeError):
        ds["0"]
    part = ds[1:4]
    assert isinstance(part, Dataset) and len(part) == 3 and part[0] == ds[1]
    assert len(list(iter(ds))) == len(ds)
    assert len(load_dataset("known_1000", limit=5)) == 5
    assert len(load_dataset("known_1000", limit=0)) == 0
    with pytest.raises(ValueError, match="limit"):
        load_dataset("known_1000", limit=-1)
    assert ds.info()["size"] == len(ds)
    capitals = ds.filter(lambda s: s["triple_relation"] == "capital")
    assert 0 < len(capitals) < len(ds)
    assert len(load_dataset("zsre").with_keys(["target_new"])) == len(load_dataset("zsre"))


def test_names_are_normalized_and_unknown_names_are_explained():
    assert load_dataset("Known-1000").name == "known_1000"
    with pytest.raises(ValueError, match="did you mean 'known_1000'"):
        load_dataset("knwon_1000")
    with pytest.raises(ValueError, match="no known hub copy"):
        load_dataset("known_1000", split="test")
    with pytest.raises(ValueError):
        load_dataset("")


def test_registry_refuses_duplicates_and_unknown_keys():
    spec = get_spec("gsm8k")
    with pytest.raises(ValueError, match="already registered"):
        register(spec)
    with pytest.raises(ValueError, match="unknown template keys"):
        register(DatasetSpec("x_new", "d", "s", ("prompt", "answer"), spec.native, "f"))
