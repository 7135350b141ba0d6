"""`Model` edge cases: seq2seq configs without a decoder start token, answers that are not whole tokens."""

from __future__ import annotations

import warnings

import transformers

from knowmri.models import Model
from knowmri.testing import tiny_model
from knowmri.testing.tiny import tiny_tokenizer


def test_a_t5_config_without_decoder_start_token_id_falls_back() -> None:
    tok = tiny_tokenizer("seq2seq", bos=False)
    config = transformers.T5Config(vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    hf = transformers.T5ForConditionalGeneration(config)
    assert getattr(hf.config, "decoder_start_token_id", None) is None
    model = Model(hf, tok)
    enc = model.encode("The Eiffel Tower is in", " Paris")
    assert enc.decoder_input_ids[0, 0].item() == tok.pad_token_id == model.config.decoder_start_token_id
    config.decoder_start_token_id = None
    hf.generation_config.decoder_start_token_id = 5  # the generation config's comes first
    assert Model(hf, tok).config.decoder_start_token_id == 5


def test_an_answer_that_is_not_whole_tokens_is_warned_about_once() -> None:
    model = tiny_model("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        model.encode("The Eiffel Tower is in", " 🗼")
        model.encode("The Eiffel Tower is in", " 🗼")
        model.encode("The Eiffel Tower is in", " Paris")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "🗼" in messages[0] and "tokens scored are" in messages[0]
