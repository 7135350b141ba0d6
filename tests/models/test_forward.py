"""`Model.run`, the one forward helper: logits at kept positions (cut where the forward cannot keep them),
a key/value cache passed by the forward's own name, and `Encoded.inputs` / `read_ids` for every kind."""

import pytest
import torch

from knowmri.testing import tiny_model

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5"])
def test_kept_positions_equal_the_full_logits(family):
    model = tiny_model(family)
    enc = model.encode(PROMPT, " Paris")
    length = enc.read_ids.shape[1]
    positions = sorted({0, length - 1, enc.pred_pos % length})
    with torch.inference_mode():
        full = model.forward(**enc.inputs())
        last = model.run(**enc.inputs(), keep=1).logits
        some = model.run(**enc.inputs(), keep=positions).logits
    assert full.shape[1] == length
    assert last.shape == (1, 1, full.shape[-1]) and some.shape == (1, len(positions), full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(some, full[:, positions], atol=1e-5, rtol=1e-5)
    assert model.takes_logits_to_keep == (family in ("llama", "gpt2"))


def test_read_ids_are_the_decoders_for_seq2seq():
    t5, llama = tiny_model("t5"), tiny_model("llama")
    enc = t5.encode(PROMPT, " Paris")
    assert enc.read_ids is enc.decoder_input_ids
    assert max(enc.target_positions) < enc.read_ids.shape[1]
    enc = llama.encode(PROMPT, " Paris")
    assert enc.read_ids is enc.input_ids


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_inputs_from_embeddings_give_the_same_logits(family):
    model = tiny_model(family)
    enc = model.encode(PROMPT, " Paris")
    embed = model.embed_module if model.kind != "seq2seq" else model.hf_model.get_encoder().get_input_embeddings()
    with torch.inference_mode():
        by_ids = model.forward(**enc.inputs(2))
        by_embeds = model.forward(**enc.inputs(2, embeds=embed(enc.input_ids).repeat(2, 1, 1)))
    assert "input_ids" not in enc.inputs(embeds=embed(enc.input_ids))
    torch.testing.assert_close(by_embeds, by_ids)


def test_a_returned_cache_continues_the_forward():
    model = tiny_model("llama")
    ids = model.encode(PROMPT).input_ids
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        full = model.forward(input_ids=ids, attention_mask=mask)
        prefix = model.run(input_ids=ids[:, :-2], attention_mask=mask[:, :-2], use_cache=True)
        cache = model.output_cache(prefix)
        assert cache is not None
        rest = model.run(input_ids=ids[:, -2:], attention_mask=mask, cache=cache, keep=1)
        assert model.output_cache(model.run(input_ids=ids, attention_mask=mask)) is None
    assert model.cache_keyword in ("cache", "past_key_values")
    torch.testing.assert_close(rest.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)
