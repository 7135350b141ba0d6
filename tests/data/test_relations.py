"""Relation table, paraphrases, counterfactual subjects and control facts (knowmri.data.relations)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from knowmri.data import load_dataset
from knowmri.data.relations import (
    SLOT,
    control_facts,
    controls_for,
    counterfactual_subjects,
    paraphrases,
    relation,
    relation_id_of,
    relations,
)
from knowmri.models import Model
from knowmri.sample import Sample

ROOT = Path(__file__).resolve().parents[2]
SHARED = next((p for p in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data",
                           ROOT.parent.parent / "shared" / "data") if p.is_dir()), None)
KNOWN = SHARED / "known_1000" / "known_1000.json" if SHARED else None
FIXTURES = Path(__file__).resolve().parent / "fixtures"
needs_known = pytest.mark.skipif(KNOWN is None or not KNOWN.is_file(), reason="shared/data/known_1000 is absent")


def known_records() -> list[dict]:
    assert KNOWN is not None
    return json.loads(KNOWN.read_text(encoding="utf-8"))


def test_table_is_well_formed():
    table = relations()
    assert len(table) >= 33
    for rid, rel in table.items():
        assert re.fullmatch(r"P\d+", rid) and rel.id == rid and rel.name
        assert 4 <= len(rel.templates) <= 6 and len(set(rel.templates)) == len(rel.templates), rid
        for template in rel.templates + rel.aliases:
            assert template.count(SLOT) == 1 and template == template.strip(), (rid, template)
            assert not template.endswith((".", "{subject}")), (rid, template)
        assert 6 <= len(rel.examples) <= 15, rid
        assert all(s.strip() == s and o.strip() == o and s and o for s, o in rel.examples), rid
        assert len({s for s, _ in rel.examples}) == len(rel.examples), rid
        assert len({o for _, o in rel.examples}) >= 3, rid


def test_relation_lookup():
    assert relation("P36").name == "capital" and relation(" p36 ") is relation("P36")
    assert relation("P17").prompts("Mount Fuji")[0] == "Mount Fuji is located in the country of"
    with pytest.raises(ValueError, match="unknown relation"):
        relation("P999999")


@needs_known
def test_every_known_1000_relation_has_templates():
    counts = Counter(r["relation_id"] for r in known_records())
    assert set(counts) <= set(relations()), set(counts) - set(relations())


@needs_known
def test_known_1000_loader_fills_relation_id_and_paraphrases_build():
    ds = load_dataset("known_1000", path=KNOWN)
    assert [s["relation_id"] for s in ds] == [r["relation_id"] for r in known_records()]
    sample = ds[0]
    assert sample["relation_id"] == "P30"
    prompts = paraphrases(sample)
    assert len(prompts) >= 4 and sample["prompt"] not in prompts
    assert all(p.startswith("Vinson Massif") or "Vinson Massif" in p for p in prompts)
    assert all(Sample(prompt=p, triple_subject=sample["triple_subject"]) for p in prompts)
    assert paraphrases(sample, n=2) == prompts[:2]


@needs_known
def test_relation_text_fallback_is_never_wrong_on_known_1000():
    right = 0
    for record in known_records():
        fields = {"triple_relation": record["template"].replace("{}", "").strip()}
        found = relation_id_of(fields)
        assert found in (None, record["relation_id"]), record
        right += found == record["relation_id"]
    assert right >= 0.8 * len(known_records())


def test_relation_id_of():
    assert relation_id_of({"relation_id": "P17", "triple_relation": "capital"}) == "P17"
    assert relation_id_of({"triple_relation": "P131"}) == "P131"
    assert relation_id_of({"triple_relation": "is located in the country of"}) == "P17"
    assert relation_id_of({"triple_relation": "In  , the language spoken is"}) == "P37"
    assert relation_id_of(Sample(prompt="The capital of Peru is", triple_subject="Peru")) == "P36"
    assert relation_id_of(Sample(prompt="The Louvre is found in the city of", triple_subject="Louvre")) == "P276"
    assert relation_id_of({"triple_relation": "is developed by"}) is None  # developers and manufacturers
    assert relation_id_of({"prompt": "Hello there"}) is None
    with pytest.raises(ValueError, match="mapping"):
        relation_id_of("The capital of Peru is")  # type: ignore[arg-type]


def test_paraphrases_leave_out_the_samples_own_prompts():
    sample = Sample(prompt="The capital of Peru is", prompts=["Peru's capital is"], triple_subject="Peru",
                    ground_truth=" Lima", relation_id="P36")
    prompts = paraphrases(sample)
    assert prompts and "The capital of Peru is" not in prompts and "Peru's capital is" not in prompts
    assert all("Peru" in p and not p.endswith(" ") for p in prompts)
    assert paraphrases({"prompt": "x y", "triple_subject": "x", "relation_id": "P4242"}) == []
    assert paraphrases({"prompt": "The capital of Peru is", "relation_id": "P36"}) == []
    with pytest.raises(ValueError, match="non-negative"):
        paraphrases(sample, n=-1)


def test_counterfactual_subjects_have_other_objects():
    pairs = counterfactual_subjects("P36", exclude_subject="France", exclude_object="Paris")
    assert len(pairs) >= 6
    assert all(s != "France" and o != "Paris" for s, o in pairs)
    p19 = counterfactual_subjects("P20", exclude_object=" paris ")
    assert p19 and all(o != "Paris" for _, o in p19)
    assert all(o.split()[0] != "New" for _, o in counterfactual_subjects("P190", exclude_object="New York City"))
    assert counterfactual_subjects("P4242", "x", "y") == []
    assert len(counterfactual_subjects("P17", n=3)) == 3


def test_control_facts():
    facts = control_facts()
    assert len(facts) >= 24
    table = relations()
    for fact in facts:
        assert set(fact) == {"prompt", "ground_truth", "triple_subject", "triple_object", "relation_id"}
        assert fact["relation_id"] in table and fact["ground_truth"].startswith(" ")
        assert Sample(fact)["triple_subject"] in fact["prompt"]
    assert len({f["relation_id"] for f in facts}) >= 15
    first = control_facts(n=10)
    assert len(first) == 10 and len({f["relation_id"] for f in first}) == 10  # spread over relations
    no_capitals = control_facts(exclude_relation="P36")
    assert no_capitals and all(f["relation_id"] != "P36" for f in no_capitals)
    assert all(f["relation_id"] not in ("P36", "P37") for f in control_facts(exclude_relation=["P36", "P37"]))
    assert all("Japan" not in f["prompt"] for f in control_facts(exclude_subject="Japan"))
    assert all(f["ground_truth"] != " Paris" for f in control_facts(exclude_answer="Paris"))
    facts[0]["prompt"] = "changed"
    assert control_facts()[0]["prompt"] != "changed"


def test_controls_for_a_sample():
    sample = Sample(prompt="The capital of France is", ground_truth=" Paris", triple_subject="France")
    facts = controls_for(sample)
    assert facts and all(f["relation_id"] != "P36" and f["ground_truth"] != " Paris" for f in facts)
    assert all("France" not in f["prompt"] for f in facts)


def test_pararel_and_rome_counterfact_loaders_fill_relation_id():
    cf = load_dataset("counterfact", path=FIXTURES / "counterfact_rome.json")
    assert cf[0]["relation_id"] == "P131" and cf[1]["relation_id"] == "P37"
    if SHARED is not None and (SHARED / "pararel").is_dir():
        p = load_dataset("pararel", path=SHARED / "pararel", split="P1376")[0]
        assert p["relation_id"] == "P1376"


@pytest.mark.smollm2
def test_smollm2_answers_the_control_facts(smollm2: Model):
    facts = control_facts()
    hits = 0
    for fact in facts:
        enc = smollm2.encode(fact["prompt"], fact["ground_truth"])
        token, _ = smollm2.predict(fact["prompt"], top_k=1)[0]
        hits += token == smollm2.tokenizer.decode([enc.target_ids[0]])
    assert hits >= 0.8 * len(facts), f"{hits} of {len(facts)} control facts answered top-1"
