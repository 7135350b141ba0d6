"""Per-head attention weights (`Model.head_weights`, `head_biases`, `qkv_modules`, `n_kv_heads`; models/heads.py)
against the model's own attention on every family and Falcon's three fused layouts."""

import pytest
import torch

import knowmri as km
from knowmri.hooks import Hooks, site
from knowmri.testing import EXTRA_FAMILIES, FAMILIES, build_planted, build_tiny, tiny_model

ROTARY = {"gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi", "falcon"}
QK_NORM = {"qwen3", "gemma3"}  # q and k are normalised per head after the projections


def attention_reference(model, family):
    """Recompute the last layer's attention from `head_weights` and compare with the model's own tensors."""
    hf = model.hf_model
    hf.config._attn_implementation = "eager"
    layer = model.n_layers - 1
    ids = torch.tensor([[5, 17, 42, 8, 99, 23, 61]]) % model.vocab_size
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "output_attentions": True, "use_cache": False}
    if family in ROTARY:  # identity rotations: q.k is then content-only, as the weights describe it
        for module in hf.modules():
            if hasattr(module, "inv_freq"):
                module.inv_freq.zero_()
                module.original_inv_freq = module.inv_freq
        if family == "gptj":
            kwargs["position_ids"] = torch.zeros_like(ids)
    if model.kind == "seq2seq":
        kwargs["decoder_input_ids"] = ids
    store = {}
    first = model.qkv_modules(layer)[0]
    o_proj = model.component(layer, "attn_o")
    handles = [
        first.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0][0])),
        o_proj.register_forward_hook(lambda m, a, o: store.__setitem__("o", o[0])),
    ]
    try:
        with torch.no_grad(), Hooks(model) as h:
            heads = h.read(site(layer, "attn.heads"))
            out = hf(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    attn = (out.decoder_attentions if model.kind == "seq2seq" else out.attentions)[layer][0]  # [H, T, T]
    x = store["x"]
    w_q, w_k, w_v, w_o = model.head_weights(layer)
    b_q, b_k, b_v = model.head_biases(layer)
    assert w_q.shape == w_k.shape == w_v.shape == (model.n_heads, model.d_model, model.d_head)
    assert w_o.shape == (model.n_heads, model.d_head, model.d_model)
    with torch.no_grad():
        v = torch.einsum("td,hde->hte", x, w_v) + b_v[:, None]
        torch.testing.assert_close(torch.einsum("hts,hse->the", attn, v), heads.value[0], atol=1e-5, rtol=1e-4)
        bias = getattr(o_proj, "bias", None)
        written = torch.einsum("the,hed->td", heads.value[0], w_o) + (0 if bias is None else bias)
        torch.testing.assert_close(written, store["o"], atol=1e-5, rtol=1e-4)
        if family in QK_NORM:
            return
        q = torch.einsum("td,hde->hte", x, w_q) + b_q[:, None]
        k = torch.einsum("td,hde->hte", x, w_k) + b_k[:, None]
        module = model.component(layer, "attn")
        scale = model.d_head**-0.5 if family in ("opt", "falcon") else getattr(module, "scaling", model.d_head**-0.5)
        scores = q @ k.transpose(1, 2) * scale
        n = ids.shape[1]
        if family == "t5":
            scores = scores + model.layers[0].layer[0].SelfAttention.compute_bias(n, n)[0]
        if family == "bloom":
            from transformers.models.bloom.modeling_bloom import build_alibi_tensor

            scores = scores + build_alibi_tensor(torch.ones(1, n), model.n_heads, scores.dtype).view(
                model.n_heads, 1, n
            )
        cap = getattr(model.config, "attn_logit_softcapping", None)
        if cap:
            scores = torch.tanh(scores / cap) * cap
        if model.kind != "masked":
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(scores.softmax(-1), attn, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_head_weights_reproduce_the_attention(family):
    attention_reference(build_tiny(family), family)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_head_weights_on_planted_models(style):
    planted = build_planted(style)
    attention_reference(planted.model, "gpt2" if style == "gpt2" else "llama")
    assert planted.model.n_kv_heads() == (4 if style == "gpt2" else 2)


@pytest.mark.parametrize(
    "extra",
    [{"multi_query": True}, {"multi_query": False}, {"new_decoder_architecture": True, "num_kv_heads": 2}],
    ids=["multi_query", "interleaved", "grouped"],
)
def test_fused_layouts_split_like_the_model(extra):
    """Falcon's three fused layouts (multi-query, per-head interleaved, grouped) against the model's own attention."""
    import transformers as T

    config = T.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, **extra)
    torch.manual_seed(0)
    model = km.load_model(T.FalconForCausalLM(config), tokenizer=tiny_model("falcon").tokenizer)
    attention_reference(model, "falcon")
