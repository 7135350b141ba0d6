"""Token roles: ROME's categories (first, middle and last subject token, first subsequent token, further
tokens, last token) with the subject split (dataset aggregation) or pooled (consensus)."""

from __future__ import annotations

from knowmri.analysis.roles import POOLED_ROLES, ROLES, token_roles
from knowmri.testing import planted_model
from knowmri.token_roles import span_roles

FACT = {"prompt": "The Eiffel Tower is located in the city of", "triple_subject": "Eiffel Tower"}


def test_rome_roles_on_a_known_tokenisation() -> None:
    model = planted_model("gpt2").model  # one token per word: " The", " Eiffel", " Tower", ...
    split = token_roles(model, FACT, 9)
    assert split == {0: "before_subject", 1: "subject_first", 2: "subject_last", 3: "subsequent_first", 4: "further",
                     5: "further", 6: "further", 7: "further", 8: "last"}
    pooled = token_roles(model, FACT, 9, split_subject=False)
    assert pooled == {0: "before_subject", 1: "subject", 2: "subject", 3: "relation", 4: "relation", 5: "relation",
                      6: "relation", 7: "relation", 8: "last"}
    assert set(split.values()) <= set(ROLES) and set(pooled.values()) <= set(POOLED_ROLES)


def test_span_roles_middle_tokens_and_edges() -> None:
    assert span_roles(7, 1, 5) == ["before_subject", "subject_first", "subject_middle", "subject_middle",
                                   "subject_last", "subsequent_first", "last"]
    assert span_roles(4, 0, 1) == ["subject_last", "subsequent_first", "further", "last"]
    assert span_roles(3, 1, 3) == ["before_subject", "subject_first", "last"]  # the last token wins
    assert span_roles(3, None, None) == ["other", "other", "last"]
    assert span_roles(0, 0, 1) == []


def test_one_token_subject_is_its_last_token_and_positions_past_the_prompt_are_ignored() -> None:
    model = planted_model("gpt2").model
    sample = {"prompt": FACT["prompt"], "triple_subject": "Tower"}
    assert token_roles(model, sample, 9)[2] == "subject_last"
    assert token_roles(model, sample, 9)[1] == "before_subject"
    assert token_roles(model, sample, 9, split_subject=False)[2] == "subject"
    assert token_roles(model, FACT, 2) == {0: "before_subject", 1: "last"}


def test_without_a_model_or_subject_other_and_last() -> None:
    assert token_roles(None, FACT, 4) == {0: "other", 1: "other", 2: "other", 3: "last"}
    model = planted_model("gpt2").model
    assert token_roles(model, {"prompt": FACT["prompt"]}, 3) == {0: "other", 1: "other", 2: "last"}
    assert token_roles(model, None, 1) == {0: "last"}
    assert token_roles(model, FACT, 0) == {}
