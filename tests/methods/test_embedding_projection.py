"""Embedding projection: per-head weights against the model's own attention on every family, the four
projections against direct computations, and the planted head and neuron."""

import json

import pytest
import torch

import knowmri as km
from knowmri.hooks import Hooks, site
from knowmri.methods._weights import _module, head_biases, head_weights, n_kv_heads, ov_circuit, qkv_layout
from knowmri.methods.base import RunContext, get_method
from knowmri.testing import EXTRA_FAMILIES, FAMILIES, build_planted, build_tiny, tiny_model

FACT = {
    "prompt": "The Eiffel Tower is located in the city of",
    "ground_truth": " Paris",
    "triple_subject": "Eiffel Tower",
}
ROTARY = {"gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi", "falcon"}
QK_NORM = {"qwen3", "gemma3"}  # q and k are normalised per head after the projections


def run(model, sample, **params):
    method = get_method("embedding_projection")
    return method.run(model, km.Sample(sample), method.Params.from_dict(params), RunContext())


def attention_reference(model, family):
    """Recompute the last layer's attention from head_weights and compare with the model's own tensors."""
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
    first = _module(model, layer, "attn_q" if qkv_layout(model) == "separate" else "attn_qkv")
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
    w_q, w_k, w_v, w_o = head_weights(model, layer)
    b_q, b_k, b_v = head_biases(model, layer)
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
    assert n_kv_heads(planted.model) == (4 if style == "gpt2" else 2)


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


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_every_family(family):
    model = tiny_model(family)
    result = run(model, FACT, top_neurons=3, top_heads=2, n_neighbours=3)
    f = result.findings
    assert len(f["layer_tokens"]) == len(f["target_rank"]) == model.n_layers
    assert len(f["neurons"]) == 3 and all(len(n["tokens"]) == 5 for n in f["neurons"])
    assert len(f["heads"]) == 2 and all(h["copies"] for h in f["heads"])
    assert all(len(v) == 3 for v in f["neighbours"].values())
    assert [fig["name"] for fig in result.figures] == [
        "Rank of the answer and the final top tokens by layer",
        "Prompt tokens and their embedding neighbours",
    ]
    json.dumps(result.to_dict(), allow_nan=False)


def test_projections_match_direct_computation():
    model = tiny_model("gpt2")
    f = run(model, FACT, top_neurons=4, heads=["1.2"], n_neighbours=4).findings
    tok = model.tokenizer
    enc = model.encode(FACT["prompt"], FACT["ground_truth"])
    pos = enc.pred_pos
    with torch.no_grad(), Hooks(model) as h:
        resid = [h.read(site(layer, "resid_post")) for layer in range(model.n_layers)]
        acts = [h.read(site(layer, "mlp.neurons")) for layer in range(model.n_layers)]
        model.forward(**enc.inputs())
        unembed = model.unembedding
        for layer in range(model.n_layers):  # (1) residual stream times the unembedding, no norm
            logits = resid[layer].value[0, pos] @ unembed.T
            assert f["layer_tokens"][layer] == [tok.decode([int(i)]) for i in logits.topk(5).indices]
        scores = torch.stack(
            [
                acts[layer].value[0, pos].abs() * model.mlp_value_vectors(layer).norm(dim=-1)
                for layer in range(model.n_layers)
            ]
        )
        best = scores.flatten().topk(4).indices
        assert [(n["layer"], n["unit"]) for n in f["neurons"]] == [
            (int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in best
        ]
        n0 = f["neurons"][0]
        direction = model.mlp_value_vectors(n0["layer"])[n0["unit"]] * (1 if n0["activation"] > 0 else -1)
        assert n0["tokens"] == [tok.decode([int(i)]) for i in (direction @ unembed.T).topk(5).indices]
        head = f["heads"][0]  # (3) OV circuit of head 1.2 on the embedding of " Paris"
        assert (head["layer"], head["head"]) == (1, 2)
        w_v, w_o = ov_circuit(model, 1, 2)
        paris = tok(" Tower", add_special_tokens=False)["input_ids"][0]
        writes = (model.embed_module.weight[paris] @ w_v @ w_o @ unembed.T).topk(5).indices
        copy = next(c for c in head["copies"] if c["token"] == " Tower")
        assert copy["writes"] == [tok.decode([int(i)]) for i in writes]
        emb = torch.nn.functional.normalize(model.embed_module.weight, dim=-1)  # (4) cosine neighbours
        sims = emb @ emb[paris]
        sims[paris] = -2
        assert f["neighbours"][" Tower"] == [tok.decode([int(i)]) for i in sims.topk(4).indices]


def test_final_norm_option_agrees_with_logit_lens(planted):
    lens = get_method("logit_lens")
    ranks = lens.run(planted.model, planted.sample, lens.Params(), RunContext()).findings["target_rank"]
    f = run(planted.model, dict(planted.sample), final_norm=True, top_neurons=1).findings
    assert f["target_rank"] == ranks
    assert f["first_top1_layer"] == planted.answer_layer


def test_planted_head_neuron_and_ov_circuit(planted):
    model = planted.model
    f = run(model, dict(planted.sample), top_heads=1).findings
    assert (f["heads"][0]["layer"], f["heads"][0]["head"]) == planted.head  # it writes most at the last position
    at_subject = run(model, dict(planted.sample), position=planted.neuron_position, top_neurons=1, top_heads=0).findings
    assert (at_subject["neurons"][0]["layer"], at_subject["neurons"][0]["unit"]) == planted.neuron
    # The planted neuron writes the fact; the planted head's OV circuit turns it into " Paris".
    layer, unit = planted.neuron
    w_v, w_o = ov_circuit(model, *planted.head)
    with torch.no_grad():
        logits = model.mlp_value_vectors(layer)[unit] @ w_v @ w_o @ model.unembedding.T
    assert int(logits.argmax()) == planted.answer_id


def test_bad_heads_parameter():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="layer.head"):
        run(model, FACT, heads=["x"])
    with pytest.raises(ValueError, match="does not exist"):
        run(model, FACT, heads=["9.0"])


@pytest.mark.smollm2
def test_smollm2(smollm2):
    result = run(smollm2, FACT, final_norm=True, top_neurons=5, top_heads=2, n_neighbours=5)
    f = result.findings
    assert f["target_rank"][-1] == 1 and f["first_top1_layer"] >= smollm2.n_layers // 2
    assert len(f["heads"]) == 2 and len(f["neurons"]) == 5
    assert " Tower" in f["neighbours"]
    raw = run(smollm2, FACT, top_neurons=0, top_heads=0, n_neighbours=1).findings  # the paper's projection
    assert raw["target_rank"][-1] < 100


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_projection_in_small_batches_gives_the_same_findings(monkeypatch, family):
    from knowmri.methods import embedding_projection

    model = tiny_model(family)
    whole = run(model, FACT, top_neurons=4, top_heads=3, n_neighbours=4).findings
    monkeypatch.setattr(embedding_projection, "PROJECT_CHUNK_BYTES", 4 * model.vocab_size * 3)  # 3 rows per product
    parts = run(model, FACT, top_neurons=4, top_heads=3, n_neighbours=4).findings
    for key in ("layer_tokens", "target_rank", "neurons", "heads", "neighbours"):
        assert parts[key] == whole[key]
    assert parts["target_score"] == pytest.approx(whole["target_score"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n,d,dims", [(40, 64, 2), (90, 576, 3), (5, 64, 3), (3, 8, 3)], ids=["few", "wide", "tiny", "fewer-than-dims"])
def test_pca_coords_equal_the_svd_up_to_sign(n, d, dims):
    import numpy as np

    from knowmri.methods.embedding_projection import pca_coords

    points = np.random.default_rng(0).standard_normal((n, d))
    centred = points - points.mean(0, keepdims=True)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    want = (u * s)[:, :dims]
    got = pca_coords(torch.from_numpy(centred), dims)
    assert got.shape == want.shape
    for axis in range(want.shape[1]):
        sign = np.sign(want[:, axis] @ got[:, axis]) or 1.0
        assert np.allclose(got[:, axis], sign * want[:, axis], atol=1e-8)
