"""Patchscopes: an echo of the source token is never counted as a decoded subject, the batched decoding
equals the per-layer loop, the identity prompt degrades gracefully for tokenizers that cannot spell it, and
real known_1000 facts on SmolLM2."""

import json
from pathlib import Path

import pytest
import torch

import knowmri as km
from knowmri.hooks import Hooks, site
from knowmri.methods.base import RunContext, get_method
from knowmri.methods.patchscope_engine import decode_batched, decode_per_layer, target_ids
from knowmri.methods.patchscope_text import entity_words, is_echo, mentions, names_entity
from knowmri.methods.patchscopes import ENTITY_PROMPT, IDENTITY_PROMPT
from knowmri.testing import FAMILIES, tiny_model
from knowmri.testing.tiny import kind_of

FACT = {
    "prompt": "The Eiffel Tower is located in the city of",
    "ground_truth": " Paris",
    "triple_subject": "Eiffel Tower",
}
CAUSAL = [f for f in FAMILIES if kind_of(f) == "causal"]


def run(model, sample, **params):
    method = get_method("patchscopes")
    return method.run(model, km.Sample(sample), method.Params.from_dict(params), RunContext())


def source_states(model, prompt, position):
    enc = model.encode(prompt)
    with torch.no_grad(), Hooks(model) as h:
        caps = [h.read(site(layer, "resid_post"), positions=[position]) for layer in range(model.n_layers)]
        model.forward(**enc.inputs())
    return torch.stack([c.value[0, 0] for c in caps])


def test_planted_echo_is_not_counted_as_decoded(planted):
    result = run(planted.model, dict(planted.sample), max_new_tokens=4, target_prompt=IDENTITY_PROMPT)
    f = result.findings
    assert f["source_position"] == planted.neuron_position  # the subject's last token
    assert f["source_token"] == " Tower"
    # Before the fact is recalled the subject position carries " Tower" and the identity prompt repeats
    # it: an echo of the token, not the entity "Eiffel Tower".
    assert f["decoded_tokens"][0][0] == " Tower" and f["echo"][0] and 0 in f["echo_layers"]
    assert f["entity_words"] == ["eiffel"]
    assert not any(f["subject_recovered"]) and f["recovered_layers"] == []
    assert f["holds"] is False and "layer_scores" not in f
    assert [d["rate"] for d in f["decode_rate"]] == [0.0] * planted.model.n_layers
    assert "nothing is decoded" in result.summary and "echo" in result.summary
    assert len(f["decoded"]) == len(f["entity_word_prob"]) == planted.model.n_layers
    json.dumps(result.to_dict(), allow_nan=False)


def test_echo_rule():
    subject = "Marshall Islands"
    assert entity_words(subject, " Islands") == ["marshall"]
    assert is_echo(": The islands of the Pacific Ocean", subject, " Islands")
    assert not names_entity(": The islands of the Pacific Ocean", subject, " Islands")
    assert names_entity(": The Republic of the Marshall Islands\nSoccer", subject, " Islands")
    assert not is_echo(": The Republic of the Marshall Islands", subject, " Islands")
    # Only the first line (the description) counts; later lines are invented examples.
    assert not names_entity(": Island nation\nMarshall: a name", subject, " Islands")
    # A fragment's word is not in the fragment: naming it is resolution, not an echo.
    assert entity_words("Catalonia", "onia") == ["catalonia"]
    assert names_entity(": Catalonia is a region of Spain", "Catalonia", "onia")
    assert not names_entity(": Catalan is a language", "Catalonia", "onia")  # whole words only
    assert names_entity(": The Marshall's flag", subject, " Islands")  # possessive allowed
    # A one-token subject can never be told from an echo; words the target prompt offers do not count.
    assert entity_words("Google", " Google") == []
    assert not names_entity(" Google is a company", "Google", " Google")
    assert entity_words("Samsung Galaxy", " Galaxy", ENTITY_PROMPT) == []
    assert not is_echo(": A Japanese company", subject, " Islands")


def test_one_token_subject_warns(planted):
    sample = dict(planted.sample, triple_subject="Tower")
    f = run(planted.model, sample, max_new_tokens=2, target_prompt=IDENTITY_PROMPT).findings
    assert f["entity_words"] == [] and f["holds"] is False
    assert "cannot be told from an echo" in f["warnings"][0]


@pytest.mark.parametrize("family", CAUSAL)
def test_batched_equals_per_layer_loop(family):
    model = tiny_model(family)
    states = source_states(model, FACT["prompt"], 3)
    ids, _ = target_ids(model, IDENTITY_PROMPT)
    for position, layer in ((len(ids) - 1, None), (len(ids) - 3, None), (len(ids) - 1, 1)):
        tokens, probs = decode_batched(model, states, ids, position, layer, 3)
        ref_tokens, ref_probs = decode_per_layer(model, states, ids, position, layer, 3)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-4)


def test_method_matches_the_reference_loop(planted):
    model = planted.model
    f = run(model, dict(planted.sample), max_new_tokens=3, target_layer="1", target_prompt=IDENTITY_PROMPT).findings
    states = source_states(model, planted.sample["prompt"], planted.neuron_position)
    ids, _ = target_ids(model, IDENTITY_PROMPT)
    tokens, probs = decode_per_layer(model, states, ids, len(ids) - 1, 1, 3)
    assert f["decoded"] == [model.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in tokens]
    torch.testing.assert_close(
        torch.tensor(f["step_probs"]), probs.gather(-1, tokens[..., None]).squeeze(-1), atol=1e-5, rtol=1e-4
    )


def test_without_subject_reads_the_last_token():
    model = tiny_model("llama")
    f = run(model, {"prompt": FACT["prompt"]}, max_new_tokens=2).findings
    enc = model.encode(FACT["prompt"])
    assert f["source_position"] == enc.prompt_len - 1
    assert f["expected_kind"] == "model prediction"
    explicit = run(model, {"prompt": FACT["prompt"]}, max_new_tokens=2, source_position=-2).findings
    assert explicit["source_position"] == enc.prompt_len - 2


def test_unknown_words_are_dropped_from_the_target_prompt():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "cat", "->", "hello", ";", "?", "1135"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")

    class Words:
        tokenizer = tok

    ids, text = target_ids(Words(), IDENTITY_PROMPT)  # "cat;" is unknown as one word: split, then kept
    assert text == "cat -> cat ; 1135 -> 1135 ; hello -> hello ; ?"
    assert tok.unk_token_id not in ids
    ids, text = target_ids(Words(), "cat -> cat; dog -> dog; ?")
    assert text == "cat -> cat ; -> ; ?"
    assert target_ids(tiny_model("gpt2"), IDENTITY_PROMPT)[1] == IDENTITY_PROMPT  # byte-level BPE spells anything


def test_mentions():
    assert mentions(" -> Tower of London", "Eiffel Tower")
    assert not mentions(" Towering", "Paris")
    assert not mentions(" Paris", "Eiffel Tower")


def test_bad_parameters():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="out of range"):
        run(model, FACT, source_position=40)
    with pytest.raises(ValueError, match="target_layer"):
        run(model, FACT, target_layer="9")
    with pytest.raises(ValueError, match="target_layer"):
        run(model, FACT, target_layer="middle")


def test_not_offered_for_masked_or_seq2seq_models():
    for family in ("bert", "t5"):
        match = {m.name: m for m in km.match(km.Sample(FACT), tiny_model(family))}["patchscopes"]
        assert not match.eligible


KNOWN_1000 = Path("/work/shared/data/known_1000/known_1000.json")


def known_record(subject):
    if not KNOWN_1000.is_file():
        pytest.skip("the real known_1000 file is not in /work/shared/data")
    record = next(r for r in json.loads(KNOWN_1000.read_text()) if r["subject"] == subject)
    return {"prompt": record["prompt"], "ground_truth": " " + record["attribute"], "triple_subject": subject}


@pytest.mark.smollm2
def test_smollm2_resolves_a_real_fact_and_counts_no_echo(smollm2):
    # known_1000: "Marshall Islands's capital city," -> Majuro. The source token is " Islands".
    result = run(smollm2, known_record("Marshall Islands"))
    f = result.findings
    assert f["source_token"] == " Islands" and f["entity_words"] == ["marshall"]
    assert f["holds"] and f["recovered_layers"]
    for layer in f["recovered_layers"]:
        assert "marshall" in f["decoded"][layer].lower()
    assert f["echo_layers"]  # layers that only say "islands" exist, and none is counted
    assert not set(f["echo_layers"]) & set(f["recovered_layers"])
    assert "decodable" in result.summary
