"""Embedding projection: the four projections against direct computations, and the planted head and neuron."""

import json
from pathlib import Path

import pytest
import torch

import knowmri as km
from knowmri.hooks import Hooks, site
from knowmri.methods.base import RunContext, get_method
from knowmri.testing import FAMILIES, build_planted, tiny_model

FACT = {
    "prompt": "The Eiffel Tower is located in the city of",
    "ground_truth": " Paris",
    "triple_subject": "Eiffel Tower",
}


def run(model, sample, **params):
    method = get_method("embedding_projection")
    return method.run(model, km.Sample(sample), method.Params.from_dict(params), RunContext())


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
        "Rank of the answer by layer, with and without the final norm",
        "Rank of the answer and the final top tokens by layer",
        "Prompt tokens and their embedding neighbours",
    ]
    json.dumps(result.to_dict(), allow_nan=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_reads_the_last_layer_as_the_model_does(family):
    """By default the residual stream is read through the final norm: the last layer's top token is the model's
    output; the raw projection is kept beside it (`target_rank_direct`) and equals the unembedding alone."""
    model = tiny_model(family)
    f = run(model, FACT, top_neurons=0, top_heads=0, n_neighbours=1).findings
    enc = model.encode(FACT["prompt"], FACT["ground_truth"])
    with torch.no_grad(), Hooks(model) as h:
        resid = [h.read(site(layer, "resid_post")) for layer in range(model.n_layers)]
        out = model.forward(**enc.inputs())[0, enc.pred_pos]
        states = torch.stack([r.value[0, enc.pred_pos] for r in resid])
        normed, raw = model.readout(states), states @ model.unembedding.T
    target = enc.target_ids[0]
    rank = lambda logits: [int((row > row[target]).sum()) + 1 for row in logits]  # noqa: E731
    assert f["final_norm"] is (model.final_norm is not None)
    assert f["target_rank_direct"] == rank(raw)
    assert f["target_rank_final_norm"] == (rank(normed) if model.final_norm is not None else rank(raw))
    assert f["target_rank"] == f["target_rank_final_norm"]
    if model.final_norm is not None and model.kind == "causal":
        assert f["model_top_token"] == model.tokenizer.decode([int(out.argmax())])
        assert f["agrees_with_output"] and not any("the model outputs" in w for w in f["warnings"])
    assert f["holds"] == (min(f["target_rank"]) <= 10)
    assert f["first_top1_layer"] == next((i for i, r in enumerate(f["target_rank"]) if r == 1), None)


def test_raw_projection_warns_when_it_disagrees_with_the_output():
    """A final LayerNorm whose bias writes " Berlin": the model outputs " Berlin", which only the reading
    through the final norm sees; the raw projection still ranks " Paris" first and is flagged."""
    planted = build_planted("gpt2")
    model = planted.model
    berlin = model.unembedding[planted.other_answer_id]
    with torch.no_grad():
        model.final_norm.bias.copy_(50.0 * berlin / berlin.norm())
    assert model.predict(planted.sample["prompt"], top_k=1)[0][0] == " Berlin"
    normed = run(model, dict(planted.sample), top_neurons=0, top_heads=0).findings
    assert normed["agrees_with_output"] and normed["warnings"] == [] and normed["last_layer_top_token"] == " Berlin"
    result = run(model, dict(planted.sample), final_norm=False, top_neurons=0, top_heads=0)
    raw = result.findings
    assert raw["last_layer_top_token"] == " Paris" and not raw["agrees_with_output"]
    assert "the model outputs ' Berlin'" in raw["warnings"][0] and "Warning:" in result.summary
    assert raw["target_rank_final_norm"] == normed["target_rank"]


def test_never_ranked_answer_does_not_hold():
    model = tiny_model("llama")  # random weights: " Paris" is nowhere near the top
    result = run(model, FACT, top_neurons=0, top_heads=0)
    f = result.findings
    assert min(f["target_rank"]) > 10
    assert f["holds"] is False and f["first_top1_layer"] is None
    assert any("never ranks in the top 10" in w for w in f["warnings"]) and "never the top token" in result.summary


def test_projections_match_direct_computation():
    model = tiny_model("gpt2")
    f = run(model, FACT, final_norm=False, top_neurons=4, heads=["1.2"], n_neighbours=4).findings
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
        w_v, w_o = model.ov_circuit(1, 2)
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
    w_v, w_o = model.ov_circuit(*planted.head)
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
    raw = run(smollm2, FACT, final_norm=False, top_neurons=0, top_heads=0, n_neighbours=1).findings  # the paper's
    assert raw["target_rank"][-1] < 100 and raw["target_rank"] == f["target_rank_direct"]
    assert not raw["agrees_with_output"] and raw["warnings"]


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

    from knowmri.methods.projection_engine import pca_coords

    points = np.random.default_rng(0).standard_normal((n, d))
    centred = points - points.mean(0, keepdims=True)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    want = (u * s)[:, :dims]
    got = pca_coords(torch.from_numpy(centred), dims)
    assert got.shape == want.shape
    for axis in range(want.shape[1]):
        sign = np.sign(want[:, axis] @ got[:, axis]) or 1.0
        assert np.allclose(got[:, axis], sign * want[:, axis], atol=1e-8)


KNOWN_1000 = Path("/work/shared/data/known_1000/known_1000.json")


@pytest.mark.smollm2
def test_smollm2_last_layer_agrees_with_the_output_on_known_facts(smollm2):
    """Real known_1000 facts SmolLM2 answers: through the final norm (the default) the last layer ranks the answer
    first, as the model does; the raw projection, shown beside it, ranks it in the thousands."""
    if not KNOWN_1000.is_file():
        pytest.skip(f"needs {KNOWN_1000}")
    by_prompt = {s["prompt"]: s for s in km.load_dataset("known_1000", path=str(KNOWN_1000))}
    for prompt in ["Catalonia belongs to the continent of", "Vichy France's capital,"]:
        f = run(smollm2, by_prompt[prompt], top_neurons=2, top_heads=1, n_neighbours=2).findings
        assert f["final_norm"] and f["agrees_with_output"] and f["warnings"] == [] and f["holds"]
        assert f["target_rank"][-1] == 1 and f["first_top1_layer"] is not None
        assert f["target_rank_direct"][-1] > 100
