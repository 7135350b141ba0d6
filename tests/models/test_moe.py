"""Mixture-of-experts families: loading, MoE facts, every MoE site readable and patchable, re-routing."""

import dataclasses

import pytest
import torch

import knowmri as km
from knowmri.hooks import Hooks, expert_site, site
from knowmri.methods.base import list_methods
from knowmri.testing.tiny import D_EXPERT, D_SHARED, MOE_FAMILIES, N_EXPERTS, TOP_K, tiny_model

PROMPT = "The Eiffel Tower is located in the city of"
FACT = {"prompt": PROMPT, "ground_truth": " Paris", "triple_subject": "Eiffel Tower",
        "triple_relation": "is located in the city of", "triple_object": "Paris", "target_new": " Rome",
        "prompts": [PROMPT, "The Eiffel Tower is in the city of"]}
QUICK = {"samples": 2, "window": 2, "steps": 2, "ig_steps": 2, "max_new_tokens": 4, "epochs": 2,
         "vocab_limit": 200, "hidden_dim": 32, "internal_batch_size": 4}


@pytest.fixture(params=MOE_FAMILIES)
def model(request):
    return tiny_model(request.param)


def test_moe_facts(model):
    assert model.n_experts == N_EXPERTS
    assert model.experts_per_token == TOP_K
    assert model.d_expert == model.d_mlp == D_EXPERT
    assert model.d_shared == (D_SHARED if model.spec.family == "qwen2_moe" else 0)
    assert model.moe_layers == tuple(range(model.n_layers))
    assert "moe" in model.capabilities
    assert model.info()["n_experts"] == N_EXPERTS
    assert model.expert_value_vectors(1, 2).shape == (D_EXPERT, model.d_model)
    assert model.expert_key_vectors(1, 2).shape == (D_EXPERT, model.d_model)
    with pytest.raises(ValueError, match="mixture of experts"):
        model.mlp_value_vectors(0)


def test_dense_models_have_no_experts():
    dense = tiny_model("llama")
    assert dense.n_experts == 0 and dense.experts_per_token == 0 and dense.moe_layers == ()
    assert "n_experts" not in dense.info()
    with Hooks(dense) as h, pytest.raises(ValueError, match="not a mixture of experts"):
        h.read(site(0, "moe.router"))


def _run(model, build):
    enc = model.encode(PROMPT, " Paris")
    with Hooks(model) as h:
        caps = build(h)
        logits = model.forward(**enc.inputs())
    return logits, caps


def test_sites_read_without_changing_the_output(model):
    enc = model.encode(PROMPT, " Paris")
    base = model.forward(**enc.inputs())
    names = [site(1, "moe.router"), site(1, "mlp.out")] + [expert_site(1, e, k) for e in range(N_EXPERTS)
                                                           for k in ("neurons", "out")]
    if model.d_shared:
        names += [site(1, "moe.shared.neurons"), site(1, "moe.shared.out")]
    logits, caps = _run(model, lambda h: {n: h.read(n) for n in names})
    assert torch.allclose(logits, base, atol=1e-5)
    T = enc.input_ids.shape[1]
    assert caps[site(1, "moe.router")].value.shape == (1, T, N_EXPERTS)
    neurons = torch.stack([caps[expert_site(1, e)].value for e in range(N_EXPERTS)], 2)  # [1, T, E, d_expert]
    assert neurons.shape == (1, T, N_EXPERTS, D_EXPERT)
    routed = neurons.abs().sum(-1) > 0
    assert (routed.sum(-1) == TOP_K).all(), "each token runs exactly its experts_per_token experts"
    chosen = caps[site(1, "moe.router")].value.topk(TOP_K, dim=-1).indices
    assert torch.equal(routed[0].nonzero()[:, 1].view(T, TOP_K).sort(-1).values, chosen[0].sort(-1).values)
    total = sum(caps[expert_site(1, e, "out")].value for e in range(N_EXPERTS))
    if model.d_shared:
        assert caps[site(1, "moe.shared.neurons")].value.shape == (1, T, D_SHARED)
        assert caps[site(1, "moe.shared.out")].value.shape == (1, T, model.d_model)
    else:
        assert torch.allclose(total, caps[site(1, "mlp.out")].value, atol=1e-5)


def test_expert_sites_are_patchable(model):
    enc = model.encode(PROMPT, " Paris")
    base = model.forward(**enc.inputs())
    _, caps = _run(model, lambda h: {"r": h.read(site(2, "moe.router"))})
    expert = int(caps["r"].value[0, -1].argmax())
    logits, _ = _run(model, lambda h: h.ablate(expert_site(2, expert), positions=[-1]))
    assert not torch.allclose(logits[0, -1], base[0, -1])
    assert torch.allclose(logits[0, :-1], base[0, :-1], atol=1e-5)
    logits, _ = _run(model, lambda h: h.scale(expert_site(2, expert, "out"), 0.0))
    assert not torch.allclose(logits[0, -1], base[0, -1])


def test_router_drop_and_force(model):
    drop = torch.zeros(N_EXPERTS)
    drop[0] = float("-inf")

    def dropped(h):
        h.add(site(1, "moe.router"), drop)
        return {"n": h.read(expert_site(1, 0))}

    _, caps = _run(model, dropped)
    assert caps["n"].value.abs().sum() == 0, "a dropped expert runs on no token"
    force = torch.zeros(N_EXPERTS)
    force[3] = 1e4

    def forced(h):
        h.add(site(1, "moe.router"), force)
        return {"n": h.read(expert_site(1, 3))}

    _, caps = _run(model, forced)
    assert (caps["n"].value.abs().sum(-1) > 0).all(), "a forced expert runs on every token"


def test_site_errors(model):
    with Hooks(model) as h:
        with pytest.raises(ValueError, match="no single MLP"):
            h.read(site(0, "mlp.neurons"))
        with pytest.raises(ValueError, match="out of range"):
            h.read(expert_site(0, N_EXPERTS))
        if not model.d_shared:
            with pytest.raises(ValueError, match="no shared expert"):
                h.read(site(0, "moe.shared.out"))


def test_gradients_reach_expert_neurons(model):
    enc = model.encode(PROMPT, " Paris")
    with Hooks(model) as h:
        caps = [h.read(expert_site(1, e), grad=True) for e in range(N_EXPERTS)]
        with torch.enable_grad():
            logits = model.forward(**enc.inputs())
            grads = torch.autograd.grad(logits[0, -1].logsumexp(-1), [c.value for c in caps])
    routed = torch.stack([c.value.detach().abs().sum(-1) > 0 for c in caps])
    has_grad = torch.stack([g.abs().sum(-1) > 0 for g in grads])
    assert not (has_grad & ~routed).any(), "unrouted tokens get no gradient"


def test_load_model_wraps_moe_objects(model):
    again = km.load_model(model.hf_model, tokenizer=model.tokenizer)
    assert again.n_experts == N_EXPERTS and again.spec.family == model.spec.family


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_method_runs_or_says_why(family, tmp_path, monkeypatch):
    """The whole registry on each tiny MoE family: every method runs, and the neuron methods name each
    neuron's expert."""
    monkeypatch.setenv("KNOWMRI_HOME", str(tmp_path))
    model = tiny_model(family)
    params = {}
    for cls in list_methods():
        names = {f.name for f in dataclasses.fields(cls.Params)}
        params[cls.name] = {k: v for k, v in QUICK.items() if k in names}
    report = km.diagnose(km.Sample(FACT), model, params=params, progress=False, consensus=False)
    for name, result in report.results.items():
        assert result.status == "ok", (name, result.error)
        for neuron in (result.findings or {}).get("neurons", []):
            assert "expert" in neuron, name
    assert report.results["causal_tracing"].status == "ok"
    assert report.results["moe_routing"].status == "ok"
