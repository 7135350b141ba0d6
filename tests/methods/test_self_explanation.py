"""Self-explanation: the parser on crafted explanations, generation on tiny models (plain and
chat-template paths, causal and seq2seq), the side-by-side with integrated gradients, SmolLM2."""

import copy

import pytest

import knowmri as km
from knowmri.methods.base import RunContext, get_method
from knowmri.methods.self_explanation import (
    _generate,
    answer_complete,
    explanation_complete,
    explanation_text,
    first_sentence,
    parse_named_words,
    prompt_words,
    word_tokens,
)
from knowmri.models.model import Model
from knowmri.testing import tiny_model

PROMPT = "The Eiffel Tower is located in the city of"
FACT = km.Sample(prompt=PROMPT, ground_truth=" Paris", triple_subject="Eiffel Tower")


def run(model, sample=FACT, ctx=None, **params):
    method = get_method("self_explanation")
    return method.run(model, sample, method.Params.from_dict({"max_new_tokens": 6, "answer_tokens": 3, **params}),
                      ctx or RunContext())


def words(named):
    return [(n["word"], n["quoted"]) for n in named]


def test_parser_quoted_first_then_mentions():
    text = 'I relied on “eiffel” and \'Towers\', because the word city suggests a place, not "Paris".'
    assert words(parse_named_words(text, PROMPT)) == [("Eiffel", True), ("Tower", True), ("city", False)]
    assert words(parse_named_words('The word "of" asks for a place.', PROMPT)) == [("of", True)]  # a quoted stop word counts


def test_parser_ignores_restatements_and_stopwords():
    text = ('The Eiffel Tower is located in the city of Paris, France.\n\nThe text relied on the phrase '
            '"The Eiffel Tower" to provide the location.')
    assert words(parse_named_words(text, PROMPT)) == [("Eiffel", True), ("Tower", True)]
    whole = 'The most important words were "The Eiffel Tower is located in the city of" and "Paris"'
    assert parse_named_words(whole, PROMPT) == []
    assert parse_named_words("It is in the city.", PROMPT)[0]["word"] == "city"
    assert parse_named_words("Nothing relevant here: Paris!", PROMPT) == []


def test_parser_fuzzy_and_occurrences():
    named = parse_named_words("Mostly the word 'Locatd' and the repeated 'cat'.", "A cat sat; the cat was located here")
    assert words(named) == [("located", True), ("cat", True)]
    assert named[1]["occurrences"] == [1, 4]


def test_word_tokens_cover_subword_pieces():
    model = tiny_model("llama")  # <bos> first: word indices shift by one token
    ids = model.encode(PROMPT).input_ids[0].tolist()
    spans = word_tokens(model, PROMPT, ids)
    assert len(spans) == len(prompt_words(PROMPT))
    assert spans[1] == [2] and spans[2] == [3]


def test_plain_generation_on_tiny_model():
    result = run(tiny_model("gpt2"), template="auto")
    f = result.findings
    assert f["template"] == "plain"
    assert f["explanation"].startswith('The words I relied on most were "')
    assert f["ground_truth"] == " Paris" and isinstance(f["answer"], str)
    assert len(f["token_scores"]) == len(FACT["prompt"].split())
    named_tokens = {t for n in f["named_words"] for t in n["tokens"]}
    assert {t["index"] for t in f["token_scores"] if t["score"] > 0} == named_tokens
    again = run(tiny_model("gpt2"), template="auto")
    assert again.findings["explanation"] == f["explanation"]  # greedy: deterministic


def test_generation_stops_at_the_end_of_a_learned_position_table():
    model = tiny_model("gpt2")  # 128 learned positions; the request plus 60 new tokens would pass them
    asked: list[int] = []
    generate = model.hf_model.generate

    def recording(*args, **kwargs):
        asked.append(kwargs["max_new_tokens"])
        return generate(*args, **kwargs)

    used = model.encode("the city " * 40).input_ids.shape[1]
    model.hf_model.generate = recording
    try:
        assert isinstance(_generate(model, "the city " * 40, 60, chat=False), str)  # no IndexError past position 128
    finally:
        del model.hf_model.generate
    assert used + 60 > model.max_length and asked == [model.max_length - used]
    with pytest.raises(ValueError, match="context"):
        _generate(model, "the city " * 80, 5, chat=False)


def test_chat_template_path():
    base = tiny_model("llama")
    tok = copy.deepcopy(base.tokenizer)
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    model = Model(base.hf_model, tok, name="tiny-llama-chat")
    assert "chat" in model.capabilities
    result = run(model)
    assert result.findings["template"] == "chat"
    assert "Put each word you name in double quotes" in result.findings["request"]
    with pytest.raises(ValueError):
        run(tiny_model("gpt2"), template="chat")


def test_seq2seq_and_masked():
    assert run(tiny_model("t5")).findings["template"] == "plain"
    match = {m.name: m for m in km.match(FACT, tiny_model("bert"))}["self_explanation"]
    assert not match.eligible and "generate" in " ".join(match.reasons)


def test_shows_integrated_gradients_when_cached():
    model = tiny_model("gpt2")
    ctx = RunContext()
    ig = get_method("integrated_gradients")
    ig.run(model, FACT, ig.Params.from_dict({"steps": 2}), ctx)
    result = run(model, ctx=ctx)
    comparison = result.findings["ig_comparison"]
    assert len(comparison["ig_scores"]) == len(result.findings["token_scores"])
    assert "integrated gradients" in result.tables[0]["columns"]
    assert "Integrated gradients" in result.summary


@pytest.mark.smollm2
def test_smollm2_explains_eiffel(smollm2):
    result = run(smollm2, max_new_tokens=24, answer_tokens=4)
    f = result.findings
    assert f["template"] == "chat"
    assert "Paris" in f["answer"] and f["answer_matches_ground_truth"]
    assert f["explanation"]
    assert {n["word"] for n in f["named_words"]} & {"Eiffel", "Tower"}


def test_early_stops_never_change_what_is_kept():
    """Generation stops once the kept text is final: every prefix that says so keeps what the whole text keeps."""
    answers = [" Paris, France. It is the capital", " Paris\n\nThe tower", "  Leonardo da Vinci. He's", "1,000°C. Then",
               " Rome. 's", " Paris . It", " no break at all", "\n\n Paris. I'll", " U.S. Army"]
    for full in answers:
        for cut in range(len(full) + 1):
            if answer_complete(full[:cut]):
                assert first_sentence(full[:cut]) == first_sentence(full), (full, cut)
    assert answer_complete(" Paris, France. It is") and not answer_complete(" Paris, France.")
    reply = 'Eiffel" and "Tower".\nText: "Rome is"\nContinuation'
    for cut in range(len(reply) + 1):
        if explanation_complete(reply[:cut]):
            assert explanation_text(reply[:cut]) == explanation_text(reply)
    assert explanation_text(reply) == 'The words I relied on most were "Eiffel" and "Tower".'


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_generation_stops_early_on_a_prefix_of_the_same_text(family):
    model = tiny_model(family)
    full = _generate(model, PROMPT, 12, chat=False)
    short = _generate(model, PROMPT, 12, chat=False, done=lambda text: len(text) >= 6)
    assert 6 <= len(short) < len(full) and full.startswith(short)
