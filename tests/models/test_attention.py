"""`short_attention`: the batched small-context attention equals transformers' sdpa path, hands back
what it does not cover, and leaves the model as it found it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import knowmri as km
from knowmri.methods.base import RunContext, get_method
from knowmri.models.attention import MAX_KEYS, NAME, _forward, short_attention
from knowmri.testing import FAMILIES, build_tiny, tiny_model

SDPA_FAMILIES = [f for f in FAMILIES if f in {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma",
                                               "opt", "phi", "falcon"}]  # gemma2's soft-capping: no sdpa


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def _qkv(B: int = 3, H: int = 4, Hk: int = 2, q: int = 3, k: int = 7, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, q, d, generator=g), torch.randn(B, Hk, k, d, generator=g),
            torch.randn(B, Hk, k, d, generator=g))


def _module(H: int = 4, Hk: int = 2) -> nn.Module:
    m = nn.Module().eval()
    m.num_key_value_groups, m.is_causal = H // Hk, True
    return m


def _masks(B: int, q: int, k: int) -> dict[str, torch.Tensor]:
    causal = torch.ones(q, k, dtype=torch.bool).tril(k - q)
    padded = causal.expand(B, 1, q, k).clone()
    padded[0, :, :, :2] = False  # the first row is left-padded
    additive = torch.zeros(B, 1, q, k).masked_fill(~padded, torch.finfo(torch.float32).min)
    return {"bool": padded, "bool_shared": causal.expand(1, 1, q, k), "additive": additive}


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask_kind", ["bool", "bool_shared", "additive"])
def test_equals_sdpa(heads, mask_kind):
    H, Hk = heads
    query, key, value = _qkv(H=H, Hk=Hk)
    mask = _masks(3, 3, 7)[mask_kind]
    for scaling in (None, 0.3):
        want, _ = _sdpa(_module(H, Hk), query, key, value, mask, scaling=scaling)
        got, weights = _forward(_module(H, Hk), query, key, value, mask, scaling=scaling)
        assert weights is None and got.shape == want.shape == (3, 3, H, 8)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_computes_in_float32(dtype):
    """On half-precision inputs the scores, softmax and weighted sum run in float32 (as SDPA's kernels
    accumulate): the output is the float32 attention of the same inputs, rounded once (within one unit
    of the dtype's last place, where the two float32 computations fall on either side of a rounding edge)."""
    query, key, value = (t.to(dtype) for t in _qkv())
    mask = _masks(3, 3, 7)["bool"]
    got, _ = _forward(_module(), query, key, value, mask)
    want, _ = _sdpa(_module(), query.float(), key.float(), value.float(), mask)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=1e-6, rtol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("q", [1, 7], ids=["one_query", "causal_square"])
def test_without_mask_equals_sdpa(q):
    """No mask means what sdpa makes of it: one query sees every key; q == k queries are causal."""
    query, key, value = _qkv(q=q)
    want, _ = _sdpa(_module(), query, key, value, None)
    got, _ = _forward(_module(), query, key, value, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["long", "softcap", "dropout", "no_mask", "bidirectional"])
def test_hands_back_what_it_does_not_cover(case, monkeypatch):
    """Long contexts, soft-capping, training dropout, maskless calls with fewer queries than keys and
    maskless bidirectional calls go to sdpa as they came."""
    from transformers.integrations import sdpa_attention

    k = MAX_KEYS + 1 if case == "long" else 7
    query, key, value = _qkv(k=k)
    mask = None if case == "no_mask" else _masks(3, 3, k)["bool"]
    kwargs = {"softcap": 30.0} if case == "softcap" else {}
    module = _module()
    if case == "bidirectional":
        query, mask, module.is_causal = query[:, :, :k], None, False
    if case == "dropout":
        module.train()
        kwargs["dropout"] = 0.1
    seen = []
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **kw: seen.append(kw) or ("sdpa", None))
    assert _forward(module, query, key, value, mask, **kwargs) == ("sdpa", None)
    assert len(seen) == 1 and all(seen[0].get(name) == v for name, v in kwargs.items())


def _sdpa_model(family: str):
    model = build_tiny(family)
    model.hf_model.config._attn_implementation = "sdpa"
    return model


@pytest.mark.parametrize("family", SDPA_FAMILIES)
def test_model_logits_unchanged_and_config_restored(family):
    """On every family whose attention goes through the interface, a padded batch gives the same logits
    inside the context; the configs say "sdpa" again afterwards, also after an error."""
    model = _sdpa_model(family)
    enc = model.tokenizer(["The Eiffel Tower is in", "Paris is the capital of France"], return_tensors="pt",
                          padding=True)
    with torch.no_grad():
        want = model.hf_model(**enc).logits
        with short_attention(model) as active:
            assert active and model.hf_model.config._attn_implementation == NAME
            got = model.hf_model(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert model.hf_model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), short_attention(model):
        raise RuntimeError("boom")
    assert all(getattr(m, "config", model.config)._attn_implementation == "sdpa" for m in model.hf_model.modules()
               if getattr(m, "config", None) is not None)


def test_eager_model_untouched():
    model = tiny_model("llama")
    with short_attention(model) as active:
        assert not active and model.hf_model.config._attn_implementation == "eager"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_only_the_dtypes_asked_for(dtype):
    """By default (causal tracing's float32 replays) a half-precision model keeps SDPA; asked for its
    dtype, the context takes over and the logits stay SDPA's up to the dtype's rounding."""
    model = _sdpa_model("llama")
    model.hf_model.to(dtype)
    with short_attention(model) as active:
        assert not active and model.hf_model.config._attn_implementation == "sdpa"
    ids = torch.tensor([[5, 17, 42, 8, 99, 23, 61]]) % model.vocab_size
    with torch.no_grad():
        want = model.hf_model(input_ids=ids).logits.float()
        with short_attention(model, (dtype,)) as active:
            assert active
            got = model.hf_model(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name", ["integrated_gradients", "knowledge_circuits", "patchscopes"])
def test_bfloat16_methods_run_with_it(name, monkeypatch):
    """The methods measured faster with it in bfloat16 run their passes through it there (and not in float32)."""
    import knowmri.models.attention as attention

    calls = []
    real = attention._forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_forward", spy)
    monkeypatch.setitem(__import__("transformers").AttentionInterface._global_mapping, NAME, spy)
    sample = km.Sample({"prompt": "The Eiffel Tower is located in the city of", "ground_truth": " Paris",
                        "triple_subject": "Eiffel Tower"})
    for dtype, expect in ((torch.float32, False), (torch.bfloat16, True)):
        model = _sdpa_model("llama")
        model.hf_model.to(dtype)
        calls.clear()
        method = get_method(name)
        result = method.run(model, sample, method.Params(), RunContext())
        assert result is not None and bool(calls) == expect, (dtype, len(calls))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_tracing_same_grids_as_eager(family, monkeypatch):
    """Causal tracing (which opens the context) gives an sdpa model the grids of its eager twin, and no
    attention call of the trace goes back to sdpa."""
    from transformers.integrations import sdpa_attention

    handed_back = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **kw: handed_back.append(1) or real(*a, **kw))
    sample = km.Sample(prompt="The Eiffel Tower is in", ground_truth=" Paris", triple_subject="Eiffel Tower")
    method = get_method("causal_tracing")
    params = method.Params.from_dict({"samples": 2, "window": 3})
    eager = method.run(build_tiny(family), sample, params, RunContext()).findings
    sdpa = method.run(_sdpa_model(family), sample, params, RunContext()).findings
    for kind in ("hidden", "mlp", "attn"):
        torch.testing.assert_close(torch.tensor(sdpa[kind]), torch.tensor(eager[kind]), atol=1e-5, rtol=1e-4)
    assert not handed_back
