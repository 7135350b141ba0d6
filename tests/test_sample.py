"""Samples: validation, key listing, coercion."""

import pytest

import knowmri as km
from knowmri.sample import Span, as_sample


def test_keys_lists_only_non_empty_values():
    s = km.Sample(prompt="The Eiffel Tower is located in", ground_truth=" Paris", label="", prompts=[])
    assert set(s.keys()) == {"prompt", "ground_truth"}
    assert s.get("label") is None
    assert s.to_dict() == {"prompt": "The Eiffel Tower is located in", "ground_truth": " Paris"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "The Eiffel Tower is in", "triple_subject": "Louvre"}, "does not occur"),
        ({"prompt": "x", "ground_truth": " "}, "ground_truth is empty"),
        ({"prompt": "x", "prompts": ["a", ""]}, "empty prompt"),
        ({"prompt": 3}, "must be str"),
        ({"prompt": "x", "tests": ["assert 1", 2]}, "list of strings"),
    ],
    ids=["empty-prompt", "subject-missing", "empty-answer", "empty-paraphrase", "wrong-type", "bad-list"],
)
def test_bad_samples_raise_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        km.Sample(fields)


def test_as_sample_and_replace():
    s = as_sample("Hello world")
    assert s["prompt"] == "Hello world"
    t = s.replace(ground_truth=" there")
    assert t["ground_truth"] == " there" and "ground_truth" not in s
    assert as_sample({"prompt": "x"}) == {"prompt": "x"}
    with pytest.raises(ValueError):
        as_sample(42)


def test_all_prompts_deduplicates():
    s = km.Sample(prompt="a b", prompts=["c d", "a b"])
    assert s.all_prompts() == ["a b", "c d"]


def test_span():
    span = Span(1, 4)
    assert list(span) == [1, 2, 3] and len(span) == 3
