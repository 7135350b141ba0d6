"""from_text: free text -> Sample by rules, with the keys it could not fill."""

from __future__ import annotations

import pytest

from knowmri.data import from_text
from knowmri.data.text import TEXT_KEYS, TextSample
from knowmri.sample import Sample

# text, prompt, ground_truth, subject, relation, object (None: must be missing)
FACTS = [
    ("The Eiffel Tower is located in Paris", "The Eiffel Tower is located in", " Paris", "Eiffel Tower",
     "is located in", "Paris"),
    ("The Eiffel Tower is located in Paris.", "The Eiffel Tower is located in", " Paris", "Eiffel Tower",
     "is located in", "Paris"),
    ("The Eiffel Tower is located in the city of Paris.", "The Eiffel Tower is located in the city of", " Paris",
     "Eiffel Tower", "is located in the city of", "Paris"),
    ("The capital of France is Paris.", "The capital of France is", " Paris", "France", "capital", "Paris"),
    ("France's capital is Paris", "France's capital is", " Paris", "France", "capital", "Paris"),
    ("The official language of Brazil is Portuguese", "The official language of Brazil is", " Portuguese",
     "Brazil", "official language", "Portuguese"),
    ("Paris is the capital of France.", "Paris is the capital of", " France", "Paris", "is the capital of",
     "France"),
    ("Tokyo is the capital city of Japan", "Tokyo is the capital city of", " Japan", "Tokyo",
     "is the capital city of", "Japan"),
    ("Microsoft was founded by Bill Gates.", "Microsoft was founded by", " Bill Gates", "Microsoft",
     "was founded by", "Bill Gates"),
    ("Apple was founded by Steve Jobs in 1976.", "Apple was founded by", " Steve Jobs", "Apple", "was founded by",
     "Steve Jobs"),
    ("Brazilians speak Portuguese.", "Brazilians speak", " Portuguese", "Brazilians", "speak", "Portuguese"),
    ("Bill Gates founded Microsoft.", "Bill Gates founded", " Microsoft", "Bill Gates", "founded", "Microsoft"),
    ("Shakespeare wrote Hamlet.", "Shakespeare wrote", " Hamlet", "Shakespeare", "wrote", "Hamlet"),
    ("Harry Potter was written by J.K. Rowling.", "Harry Potter was written by", " J.K. Rowling", "Harry Potter",
     "was written by", "J.K. Rowling"),
    ("Albert Einstein was born in Germany.", "Albert Einstein was born in", " Germany", "Albert Einstein",
     "was born in", "Germany"),
    ("Toyota is a company from Japan.", "Toyota is a company from", " Japan", "Toyota", "is a company from",
     "Japan"),
    ("Paris is not in Germany.", "Paris is not in", " Germany", "Paris", "is not in", "Germany"),
    ("Water boils at 100 degrees Celsius.", "Water boils at", " 100 degrees Celsius", "Water", "boils at",
     "100 degrees Celsius"),
    ("The sun rises in the east.", "The sun rises in", " the east", "sun", "rises in", "the east"),
    ("Cats are mammals.", "Cats are", " mammals", "Cats", "are", "mammals"),
    ("Roger Federer plays tennis.", "Roger Federer plays", " tennis", "Roger Federer", "plays", "tennis"),
    ("The Mona Lisa was painted by Leonardo da Vinci.", "The Mona Lisa was painted by", " Leonardo da Vinci",
     "Mona Lisa", "was painted by", "Leonardo da Vinci"),
    ("The Colosseum is in Rome!", "The Colosseum is in", " Rome", "Colosseum", "is in", "Rome"),
    ("The Nile flows through Egypt.", "The Nile flows through", " Egypt", "Nile", "flows through", "Egypt"),
    ("Bank of America is headquartered in Charlotte", "Bank of America is headquartered in", " Charlotte",
     "Bank of America", "is headquartered in", "Charlotte"),
    ("Beats Music is owned by Apple", "Beats Music is owned by", " Apple", "Beats Music", "is owned by", "Apple"),
    ("I love Paris. The Eiffel Tower is located in Paris.", "I love Paris. The Eiffel Tower is located in",
     " Paris", "Eiffel Tower", "is located in", "Paris"),
    # open prompts: no answer
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower is located in the city of", None,
     "Eiffel Tower", "is located in the city of", None),
    ("The capital of France is", "The capital of France is", None, "France", "capital", None),
    ("Lionel Messi plays for", "Lionel Messi plays for", None, "Lionel Messi", "plays for", None),
    ("Beats Music is owned by", "Beats Music is owned by", None, "Beats Music", "is owned by", None),
    # questions: the question is the prompt
    ("What is the capital of France?", "What is the capital of France?", None, "France", "capital", None),
    ("Who is the founder of Amazon?", "Who is the founder of Amazon?", None, "Amazon", "founder", None),
    ("what is the official language of Brazil", "what is the official language of Brazil", None, "Brazil",
     "official language", None),
    ("Who founded Microsoft?", "Who founded Microsoft?", None, "Microsoft", None, None),
    ("Where is the Eiffel Tower located?", "Where is the Eiffel Tower located?", None, "Eiffel Tower", None, None),
    ("Who wrote Romeo and Juliet?", "Who wrote Romeo and Juliet?", None, "Romeo and Juliet", None, None),
    ("In which city is the Colosseum?", "In which city is the Colosseum?", None, "Colosseum", None, None),
    ("Which sport does Roger Federer play?", "Which sport does Roger Federer play?", None, "Roger Federer", None,
     None),
    ("What color is the sky?", "What color is the sky?", None, "sky", None, None),
    # no fact at all
    ("Hello world", "Hello world", None, None, None, None),
    ("Review: a great movie\nSentiment:", "Review: a great movie\nSentiment:", None, None, None, None),
]


@pytest.mark.parametrize(("text", "prompt", "answer", "subject", "relation", "obj"), FACTS,
                         ids=[f[0][:40] for f in FACTS])
def test_from_text(text, prompt, answer, subject, relation, obj):
    sample = from_text(text)
    assert isinstance(sample, TextSample) and isinstance(sample, Sample)
    expected = {"prompt": prompt, "ground_truth": answer, "triple_subject": subject, "triple_relation": relation,
                "triple_object": obj}
    assert {k: sample.get(k) for k in TEXT_KEYS} == expected
    assert sample.missing == [k for k in TEXT_KEYS if expected[k] is None]
    if subject:
        assert subject in sample["prompt"]


def test_from_text_keeps_whitespace_sane_and_rejects_empty_text():
    assert from_text("  The   Colosseum  is in   Rome ")["prompt"] == "The Colosseum is in"
    for empty in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match="empty"):
            from_text(empty)
    with pytest.raises(ValueError):
        from_text(None)  # type: ignore[arg-type]


def test_from_text_sample_is_usable_as_a_sample():
    sample = from_text("Microsoft was founded by Bill Gates.")
    assert sample.keys() == {"prompt", "ground_truth", "triple_subject", "triple_relation", "triple_object"}
    assert sample.replace(target_new=" Steve Jobs")["target_new"] == " Steve Jobs"
    assert sample.to_dict()["triple_subject"] == "Microsoft"
