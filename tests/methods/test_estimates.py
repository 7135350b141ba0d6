"""`Method.estimate`: every registered method's estimate is positive and finite on several tiny
architectures, grows with the prompt and with its own steps / samples, follows the dtype, and is
cheap (no forward pass). Timings and measured memory are never asserted here (see
benchmarks/bench_estimate.py, which checks estimates against measurement)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import knowmri as km
from knowmri.methods.base import Estimate, list_methods
from knowmri.methods.costs import Dims, Pass, device_rates, pass_bytes, sample_shape, work_estimate
from knowmri.testing import build_tiny, tiny_model

FACT = {"prompt": "The Eiffel Tower is located in the city of", "ground_truth": " Paris",
        "triple_subject": "Eiffel Tower", "triple_relation": "is located in the city of", "triple_object": "Paris",
        "target_new": " Rome"}
LONGER = {**FACT, "prompt": "Every guide book and every tourist will tell you without any hesitation that the "
                            "Eiffel Tower is located in the city of"}
FAMILIES = ("gpt2", "llama", "falcon", "bert", "t5")
METHODS = [cls.name for cls in list_methods()]
#: A parameter that makes each method do more work: (name, small, large).
GROWS = {"integrated_gradients": ("steps", 4, 16), "knowledge_neurons": ("steps", 4, 16),
         "causal_tracing": ("samples", 2, 8), "knowledge_circuits": ("ig_steps", 2, 8),
         "patchscopes": ("max_new_tokens", 2, 8), "self_explanation": ("max_new_tokens", 4, 32),
         "spine": ("epochs", 1, 4)}
#: Methods whose work does not depend on the prompt (SPINE trains on the vocabulary).
PROMPT_FREE = {"spine"}


def eligible(method: str, model, sample: km.Sample) -> bool:
    return {m.name: m for m in km.match(sample, model)}[method].eligible


def estimate(method: str, model, sample: dict, **params) -> Estimate:
    cls = type(km.methods.base.get_method(method))
    return cls().estimate(model, km.Sample(sample), cls.Params.from_dict(params))


def check(est: Estimate) -> None:
    assert isinstance(est, Estimate)
    assert math.isfinite(est.seconds) and est.seconds > 0
    assert isinstance(est.memory_bytes, int) and est.memory_bytes > 0
    assert est.forward_passes >= 0 and est.backward_passes >= 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_estimate_is_positive_and_grows(method, family):
    model = tiny_model(family)
    if not eligible(method, model, km.Sample(FACT)):
        pytest.skip("not eligible")
    short, longer = estimate(method, model, FACT), estimate(method, model, LONGER)
    check(short)
    check(longer)
    if method in PROMPT_FREE:
        assert longer.seconds == pytest.approx(short.seconds)
    else:
        assert longer.seconds > short.seconds
        assert longer.memory_bytes >= short.memory_bytes
    if method in GROWS:
        name, small, large = GROWS[method]
        few, many = estimate(method, model, FACT, **{name: small}), estimate(method, model, FACT, **{name: large})
        check(few)
        assert many.seconds > few.seconds
        assert many.memory_bytes >= few.memory_bytes


def test_estimate_runs_no_forward_pass():
    model = tiny_model("llama")
    calls = []
    handle = model.hf_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for method in METHODS:
            estimate(method, model, FACT)
            estimate(method, model, {k: v for k, v in FACT.items() if k != "ground_truth"})
    finally:
        handle.remove()
    assert not calls


def test_estimate_scales_with_layers_width_and_vocabulary():
    """A bigger model (more layers, wider, larger vocabulary) costs more time and memory."""
    from knowmri.testing.tiny import tiny_tokenizer

    small = tiny_model("gpt2")
    tok = tiny_tokenizer("causal")
    config = type(small.hf_model.config)(vocab_size=len(tok), n_embd=128, n_layer=4, n_head=4, n_positions=128,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    big = km.Model(type(small.hf_model)(config).eval(), tok, name="bigger-gpt2")
    assert (big.n_layers, big.d_model) > (small.n_layers, small.d_model)
    for method in ("integrated_gradients", "causal_tracing", "knowledge_neurons", "logit_lens", "patchscopes"):
        a, b = estimate(method, small, FACT), estimate(method, big, FACT)
        assert b.seconds > a.seconds, method
        assert b.memory_bytes > a.memory_bytes, method


def test_activation_bytes_follow_the_dtype():
    """Activations kept for the backward pass take the model's dtype: bfloat16 halves them."""
    dims32 = Dims(layers=12, d=768, d_mlp=3072, heads=12, d_head=64, kv=768, vocab=50000, bytes=4,
                  block_params=7 * 768 * 768, gated=False)
    dims16 = Dims(**{**dims32.__dict__, "bytes": 2})
    work = Pass(rows=20, tokens=30, backward=True)
    assert pass_bytes(dims16, work) == pass_bytes(dims32, work) // 2
    # logits are read out in float32 whatever the model's dtype
    assert pass_bytes(dims16, Pass(rows=4, blocks=0, readout=4)) >= pass_bytes(dims32, Pass(rows=4, blocks=0, readout=4))


def test_bfloat16_model_estimates_less_activation_memory():
    model32 = build_tiny("llama")
    model16 = build_tiny("llama")
    model16.hf_model.to(torch.bfloat16)
    a = work_estimate(model32, [Pass(rows=64, tokens=sample_shape(model32, km.Sample(FACT)).input, backward=True)])
    b = work_estimate(model16, [Pass(rows=64, tokens=sample_shape(model16, km.Sample(FACT)).input, backward=True)])
    assert b.memory_bytes < a.memory_bytes
    assert b.memory_bytes == pytest.approx(a.memory_bytes / 2, rel=0.05)


def test_sample_shape_counts_tokens():
    model = tiny_model("llama")
    shape = sample_shape(model, km.Sample(FACT))
    enc = model.encode(FACT["prompt"], FACT["ground_truth"])
    assert (shape.prompt, shape.input, shape.answer) == (enc.prompt_len, enc.input_ids.shape[1], len(enc.target_ids))
    assert shape.subject is not None and shape.subject[1] > shape.subject[0]
    broken = sample_shape(model, km.Sample({"prompt": "x" * 40}))  # no answer: the prediction's one token
    assert broken.answer == 1 and not broken.has_answer


def test_rates_are_measured_lazily_and_make_sense():
    code = ("import knowmri as km, knowmri.methods.costs as c; km.methods(); "
            "assert not c._RATES, 'rates measured at import'")
    subprocess.run([sys.executable, "-c", code], check=True)
    rates = device_rates()
    assert rates.flops > 0 and rates.half_rows >= 0 and rates.op_seconds > 0 and rates.bandwidth > 0
    assert rates.matmul(1e9, 1) >= rates.matmul(1e9, 1000)  # a few rows never run faster per FLOP
