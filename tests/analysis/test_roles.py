"""Token roles: ROME's categories with the subject split (dataset aggregation) or pooled (consensus)."""

from __future__ import annotations

from knowmri.analysis.roles import POOLED_ROLES, ROLES, token_roles
from knowmri.testing import planted_model

FACT = {"prompt": "The Eiffel Tower is located in the city of", "triple_subject": "Eiffel Tower"}


def test_split_and_pooled_subject() -> None:
    model = planted_model("gpt2").model  # one token per word: " The", " Eiffel", " Tower", ...
    split = token_roles(model, FACT, 9)
    assert split == {0: "first", 1: "subject_first", 2: "subject_last", 3: "relation", 4: "relation", 5: "relation",
                     6: "relation", 7: "relation", 8: "last"}
    pooled = token_roles(model, FACT, 9, split_subject=False)
    assert pooled == {i: "subject" if role.startswith("subject") else role for i, role in split.items()}
    assert set(split.values()) <= set(ROLES) and set(pooled.values()) <= set(POOLED_ROLES)


def test_one_token_subject_is_its_last_token_and_positions_past_the_prompt_are_ignored() -> None:
    model = planted_model("gpt2").model
    sample = {"prompt": FACT["prompt"], "triple_subject": "Tower"}
    assert token_roles(model, sample, 9)[2] == "subject_last"
    assert token_roles(model, sample, 9, split_subject=False)[2] == "subject"
    assert token_roles(model, FACT, 2) == {0: "first", 1: "last"}


def test_without_a_model_or_subject_only_first_relation_and_last() -> None:
    assert token_roles(None, FACT, 4) == {0: "first", 1: "relation", 2: "relation", 3: "last"}
    model = planted_model("gpt2").model
    assert token_roles(model, {"prompt": FACT["prompt"]}, 3) == {0: "first", 1: "relation", 2: "last"}
    assert token_roles(model, None, 1) == {0: "last"}
    assert token_roles(model, FACT, 0) == {}
