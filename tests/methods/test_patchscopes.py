"""Patchscopes: the planted subject is decoded where it is carried, the batched decoding equals the
per-layer loop, and the identity prompt degrades gracefully for tokenizers that cannot spell it."""

import json

import pytest
import torch

import knowmri as km
from knowmri.hooks import Hooks, site
from knowmri.methods.base import RunContext, get_method
from knowmri.methods.patchscopes import IDENTITY_PROMPT, decode_batched, decode_per_layer, mentions, target_ids
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


def test_planted_subject_is_decoded_where_it_is_carried(planted):
    result = run(planted.model, dict(planted.sample), max_new_tokens=4)
    f = result.findings
    assert f["source_position"] == planted.neuron_position  # the subject's last token
    assert f["source_token"] == " Tower"
    # Before the fact is recalled the subject position carries " Tower" and the identity prompt repeats it.
    assert f["subject_recovered"][0] and f["decoded_tokens"][0][0] == " Tower"
    assert f["recovered_layers"][0] == 0
    assert "decodable" in result.summary
    assert len(f["decoded"]) == len(f["layer_scores"]) == planted.model.n_layers
    json.dumps(result.to_dict(), allow_nan=False)


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
    f = run(model, dict(planted.sample), max_new_tokens=3, target_layer="1").findings
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


@pytest.mark.smollm2
def test_smollm2_decodes_the_eiffel_tower(smollm2):
    prompt = "Syria: Syria\nleaf: leaf\nphysics: physics\nWTO: WTO\nx"
    f = run(smollm2, FACT, target_prompt=prompt, max_new_tokens=4).findings
    assert f["source_token"] == " Tower"
    early = f["decoded"][: 2 * smollm2.n_layers // 3]
    assert any(any(w in text.lower() for w in ("eiffel", "tower", "paris", "france")) for text in early), early
    assert any(f["subject_recovered"])
