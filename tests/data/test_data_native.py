"""Native-format loaders: the real public files in shared/data, and authored fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowmri.data import load_dataset

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data (real dataset copies) is absent")

# (dataset, path under shared/data, split, records per MANIFEST.md, keys every record provides)
FACT = ["prompt", "ground_truth", "triple_subject", "triple_relation", "triple_object"]
REAL = [
    ("known_1000", "known_1000/known_1000.json", None, 1209, FACT),
    ("counterfact", "counterfact/counterfact-val.json", None, 1919,
     ["prompt", "prompts", "ground_truth", "triple_subject", "triple_object", "target_new"]),
    ("counterfact", "knowmri_eval/counterfact.json", None, 1427,
     ["prompt", "ground_truth", "triple_subject", "triple_object"]),
    ("zsre", "zsre/zsre_mend_train-1k.json", None, 1000,
     ["prompt", "prompts", "ground_truth", "triple_subject", "triple_object"]),
    ("pararel", "pararel", None, 27610, ["prompt", "prompts", *FACT[1:]]),
    ("pararel", "pararel/graphs_json/P1376.jsonl", None, 179, ["prompt", "prompts", *FACT[1:]]),
    ("pararel", "pararel", "P1376,P36", 179 + 471, ["prompt", "prompts", *FACT[1:]]),
    ("pep3k", "pep3k/edit_set.json", None, 1531, ["prompt", "ground_truth", "label"]),
    ("pep3k", "pep3k/edit_validation_set.json", None, 306, ["prompt", "ground_truth", "label"]),
    ("pep3k", "pep3k/svo_annotated_edit_set.json", None, 1531, ["prompt", "ground_truth", "label"]),
    ("pep3k", "pep3k/probe_set.json", None, 265, ["prompt", "ground_truth", "label", *FACT[2:]]),
    ("twenty_q", "20q/edit_set.json", None, 2505, ["prompt", "ground_truth", "label"]),
    ("twenty_q", "20q/edit_validation_set.json", None, 507, ["prompt", "ground_truth", "label"]),
    ("twenty_q", "20q/svo_annotated_edit_set.json", None, 2505, ["prompt", "ground_truth", "label"]),
    ("twenty_q", "20q/probe_set.json", None, 379, ["prompt", "ground_truth", "label", *FACT[2:]]),
    ("concept_edit", "knowmri_eval/Concept_edit.json", None, 452, FACT),
    ("concept_edit", "knowmri_eval/Concept_edit.json", "mcq", 452, ["prompt", "ground_truth", "label"]),
    ("bias_neurons", "bias_neuron/gender_female_N_data.json", None, 1700, ["prompt", "ground_truth", "label"]),
    ("bias_neurons", "bias_neuron/gender_male_N_data.json", None, 1700, ["prompt", "ground_truth", "label"]),
    ("bias_neurons", "bias_neuron/data_gender_neg_female_v2.json", None, 100, ["prompt", "ground_truth", "label"]),
    ("bias_neurons", "bias_neuron", None, 3600, ["prompt", "ground_truth", "label"]),
    ("gsm8k", "gsm8k/test.jsonl", None, 1319, ["prompt", "ground_truth", "reasoning"]),
    ("imdb", "imdb/imdb_1000.json", None, 1000, ["prompt", "ground_truth", "label"]),
    ("emotion", "emotion/test.txt", None, 2000, ["prompt", "ground_truth", "label"]),
    ("emotion", "knowmri_eval/emotion.json", None, 100, ["prompt", "ground_truth", "label"]),
    ("opus_100", "opus100/en-fr", None, 2000, ["prompt", "ground_truth", "source_lang", "target_lang"]),
    ("opus_100", "opus100/af-en/opus.af-en-test.af", None, 2000, ["prompt", "ground_truth", "source_lang",
                                                                   "target_lang"]),
    ("mbpp", "mbpp/mbpp.jsonl", None, 974, ["prompt", "ground_truth", "tests"]),
    ("mbpp", "mbpp/mbpp.jsonl", "test", 500, ["prompt", "ground_truth", "tests"]),
    ("mbpp", "mbpp/mbpp.jsonl", "validation", 90, ["prompt", "ground_truth", "tests"]),
    ("mbpp", "mbpp/sanitized-mbpp.json", None, 427, ["prompt", "ground_truth", "tests"]),
    ("mbpp", "knowmri_eval/mbpp_processed.json", None, 374, ["prompt", "ground_truth", "label"]),
]


@needs_shared
@pytest.mark.parametrize(("name", "rel", "split", "count", "keys"), REAL, ids=[f"{r[0]}:{r[1]}:{r[2]}" for r in REAL])
def test_real_file_loads_with_manifest_count_and_keys(name, rel, split, count, keys):
    ds = load_dataset(name, path=SHARED / rel, split=split)
    assert len(ds) == count
    assert set(keys) <= set(ds.support_keys), ds.support_keys
    assert ds.name == name and ds.origin == str(SHARED / rel)


@needs_shared
def test_known_1000_fields():
    s = load_dataset("known_1000", path=SHARED / "known_1000/known_1000.json")[0]
    assert s["prompt"] == "Vinson Massif is located in the continent of"
    assert s["ground_truth"] == " Antarctica" and s["triple_subject"] == "Vinson Massif"
    assert s["triple_relation"] == "is located in the continent"


@needs_shared
def test_counterfact_flat_has_true_object_and_counterfactual():
    s = load_dataset("counterfact", path=SHARED / "counterfact/counterfact-val.json")[0]
    assert (s["prompt"], s["ground_truth"], s["target_new"], s["triple_subject"]) == (
        "BBC One, by", " BBC", " Sega", "BBC One")
    assert s["prompts"][1] == "BBC One is my favorite product out of everything owned by"


@needs_shared
def test_zsre_pararel_csk_fields():
    z = load_dataset("zsre", path=SHARED / "zsre/zsre_mend_train-1k.json")[0]
    assert (z["prompt"], z["ground_truth"], z["target_new"]) == (
        "What is the product made by UniFirst?", " uniform", " unmanned aircraft")
    p = load_dataset("pararel", path=SHARED / "pararel", split="P1376")[0]
    assert p["prompt"] == "Edmonton is the capital of" and p["ground_truth"] == " Alberta"
    assert len(p["prompts"]) > 1 and all("Edmonton" in q for q in p["prompts"])
    assert p["triple_relation"] == "P1376"
    c = load_dataset("pep3k", path=SHARED / "pep3k/edit_set.json")
    assert c[0]["prompt"] == "A horse rides cat. True or false? Answer:" and c[0]["label"] == "False"
    assert c[1]["label"] == "True" and c[1]["ground_truth"] == " True"
    with pytest.raises(ValueError, match="no PARAREL relation"):
        load_dataset("pararel", path=SHARED / "pararel", split="P999999")


@needs_shared
def test_task_formats_fields():
    g = load_dataset("gsm8k", path=SHARED / "gsm8k/test.jsonl")[0]
    assert g["ground_truth"] == " 18" and "<<" not in g["reasoning"] and "16 - 3 - 4 = 9" in g["reasoning"]
    e = load_dataset("emotion", path=SHARED / "emotion/test.txt")
    assert {s["label"] for s in e} == {"sadness", "joy", "love", "anger", "fear", "surprise"}
    assert sum(s["label"] == "surprise" for s in e) == 66
    i = load_dataset("imdb", path=SHARED / "imdb/imdb_1000.json")
    assert {s["label"] for s in i} <= {"Positive", "Negative"} and i[0]["label"] == "Negative"
    o = load_dataset("opus_100", path=SHARED / "opus100/en-fr")[1]
    assert o["source_lang"] == "en" and o["target_lang"] == "fr" and "Kintera" in o["prompt"]
    m = load_dataset("mbpp", path=SHARED / "mbpp/mbpp.jsonl", split="test")[0]
    namespace: dict = {}
    exec(m["ground_truth"], namespace)  # noqa: S102
    for test in m["tests"]:
        exec(test, namespace)  # noqa: S102
    sanitized = load_dataset("mbpp", path=SHARED / "mbpp/sanitized-mbpp.json")
    assert any(t.startswith("import ") for s in sanitized for t in s["tests"])
    b = load_dataset("bias_neurons", path=SHARED / "bias_neuron", split="male")
    assert {s["label"].lower() for s in b} == {"male"}


@needs_shared
def test_limit_applies_to_native_files():
    assert len(load_dataset("gsm8k", path=SHARED / "gsm8k/test.jsonl", limit=7)) == 7


# --- formats without a real copy: authored fixtures -------------------------------------

def test_metamathqa_fixture():
    ds = load_dataset("metamath", path=FIXTURES / "metamathqa.json")
    assert [s["ground_truth"] for s in ds] == [" 21", " 6", " 8"]
    assert ds[0]["reasoning"].endswith("The answer is: 21")
    assert len(load_dataset("metamath", path=FIXTURES / "metamathqa.json", split="GSM_FOBAR")) == 1


def test_opus_books_hf_fixture():
    ds = load_dataset("opus_books", path=FIXTURES / "opus_books_hf.jsonl")
    assert len(ds) == 3 and ds.support_keys == ["prompt", "ground_truth", "source_lang", "target_lang"]
    assert ds[1]["prompt"] == "Translate English to French:\nEnglish: He opened the window.\nFrench:"
    assert ds[1]["ground_truth"] == " Il ouvrit la fenêtre."


def test_rome_nested_counterfact_fixture():
    ds = load_dataset("counterfact", path=FIXTURES / "counterfact_rome.json")
    s = ds[0]
    assert s["prompt"] == "The Eiffel Tower is located in the city of"
    assert (s["ground_truth"], s["target_new"], s["triple_relation"]) == (" Paris", " Rome", "P131")
    assert s["prompts"][1].endswith("can be found in the city of")
    assert "prompts" not in ds[1] and ds[1]["target_new"] == " Japanese"


def test_hf_emotion_imdb_and_semicolon_fixtures():
    e = load_dataset("emotion", path=FIXTURES / "emotion_hf.jsonl")
    assert [s["label"] for s in e] == ["joy", "sadness", "fear", "surprise"]
    assert e[0]["prompt"] == "Text: i feel calm and glad after the concert\nEmotion:"
    i = load_dataset("imdb", path=FIXTURES / "imdb_hf.jsonl")
    assert [s["label"] for s in i] == ["Negative", "Positive"]
    t = load_dataset("emotion", path=FIXTURES / "emotion_semicolon.txt")
    assert [s["label"] for s in t] == ["joy", "anger"]


def test_concept_records_fixture():
    ds = load_dataset("concept_edit", path=FIXTURES / "concepts.json")
    assert ds[0]["prompt"] == "The definition of kettle is" and ds[0]["triple_relation"] == "definition"


def test_native_errors_name_file_record_and_field(tmp_path):
    bad_known = tmp_path / "known.json"
    bad_known.write_text('[{"subject": "Paris", "attribute": "France", "prompt": "Paris is in"}, {"attribute": "x"}]')
    with pytest.raises(ValueError, match=r"known\.json, record 1, field 'subject': missing"):
        load_dataset("known_1000", path=bad_known)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text('{"question": "1+1?", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"gsm\.jsonl, record 0, field 'answer'.*####"):
        load_dataset("gsm8k", path=gsm)
    emo = tmp_path / "emo.jsonl"
    emo.write_text('{"text": "ok", "label": 1}\n{"text": "hm", "label": 9}\n')
    with pytest.raises(ValueError, match=r"emo\.jsonl, record 1, field 'label'.*out of range"):
        load_dataset("emotion", path=emo)
    subject = tmp_path / "cf.json"
    subject.write_text('[{"prompt": "X is in", "subject": "Y", "target_new": "a", "ground_truth": "b"}]')
    with pytest.raises(ValueError, match=r"cf\.json, record 0: the subject 'Y' does not occur"):
        load_dataset("counterfact", path=subject)
    src, tgt = tmp_path / "opus.en-fr-test.en", tmp_path / "opus.en-fr-test.fr"
    src.write_text("one\ntwo\n")
    tgt.write_text("un\n")
    with pytest.raises(ValueError, match="same number of lines"):
        load_dataset("opus_100", path=src)
    with pytest.raises(ValueError, match="no such file"):
        load_dataset("gsm8k", path=tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="single split"):
        load_dataset("gsm8k", path=gsm, split="train")


def test_emotion_lines_without_header(tmp_path):
    file = tmp_path / "train.txt"
    file.write_text("i am so happy;joy\ni feel scared;fear\n")
    assert [s["label"] for s in load_dataset("emotion", path=file)] == ["joy", "fear"]
