"""Neuron methods and causal tracing on mixture-of-experts models: expert neurons as units
(`knowmri.neuron_units`), knowledge neurons equal to a straightforward per-layer loop, FiNE's contributions
adding up to the MoE block's direct effect, and the planted MoE fact found where it was put."""

import pytest
import torch

import knowmri as km
from knowmri import neuron_units as units
from knowmri.hooks import Hooks, expert_site, site
from knowmri.methods import kn_engine as kn
from knowmri.methods import neuron_readouts as nr
from knowmri.methods.kn_engine import alphas
from knowmri.testing.planted_moe import planted_moe
from knowmri.testing.tiny import D_EXPERT, MOE_FAMILIES, N_EXPERTS, tiny_model

PROMPT = "The Eiffel Tower is located in the city of"
FACT = {"prompt": PROMPT, "ground_truth": " Paris", "triple_subject": "Eiffel Tower",
        "triple_relation": "is located in the city of", "triple_object": "Paris"}


def test_units_split_and_join():
    model = tiny_model("mixtral")
    assert units.width(model) == N_EXPERTS * D_EXPERT
    assert units.split(model, 1, 3 * D_EXPERT + 5) == (3, 5)
    assert units.join(model, 1, 3, 5) == 3 * D_EXPERT + 5
    assert units.fields(model, 1, 3 * D_EXPERT + 5) == {"expert": 3, "unit": 5}
    assert units.unit_of(model, {"layer": 1, "expert": 3, "unit": 5}) == (1, 3 * D_EXPERT + 5)
    assert units.label(model, 1, 3 * D_EXPERT + 5) == "L1.E3.U5"
    with pytest.raises(ValueError, match="needs its expert"):
        units.join(model, 1, None, 5)
    dense = tiny_model("llama")
    assert units.width(dense) == dense.d_mlp and units.fields(dense, 0, 7) == {"unit": 7}
    with pytest.raises(ValueError, match="dense layer"):
        units.join(dense, 0, 1, 5)


def _reference(model, enc, jobs, steps):
    """Dai et al.'s per-layer loop on expert neurons: each layer's experts scaled together at the position."""
    a = alphas(steps, "right")
    out = torch.zeros(len(jobs), model.n_layers, units.width(model))
    for j, (scaled, predict, token) in enumerate(jobs):
        for layer in range(model.n_layers):
            names = [expert_site(layer, e) for e in range(model.n_experts)]
            with torch.no_grad(), Hooks(model) as h:
                caps = [h.read(n, positions=[scaled]) for n in names]
                model.forward(**enc.inputs())
            bases = [c.value[0, 0] for c in caps]
            leaves = [(a[:, None] * b[None, :]).requires_grad_(True) for b in bases]
            with torch.inference_mode(False), torch.enable_grad(), Hooks(model) as h:
                for n, leaf in zip(names, leaves):
                    h.replace(n, leaf[:, None, :], positions=[scaled])
                probs = model.forward(**enc.inputs(steps))[:, predict].float().softmax(-1)[:, token]
                grads = torch.autograd.grad(probs.sum(), leaves, allow_unused=True)
            for e, (g, b) in enumerate(zip(grads, bases)):
                if g is not None:
                    out[j, layer, e * D_EXPERT:(e + 1) * D_EXPERT] = g.sum(0) * b / steps
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_ig_on_expert_neurons_equals_the_per_layer_loop(family):
    model = tiny_model(family)
    enc = model.encode(PROMPT, " Paris")
    pairs = nr.answer_tokens(model, enc)
    jobs, positions = kn.ig_jobs(model, enc, pairs, "answer")
    clean, _ = nr.clean_neurons(model, enc, positions)
    got = kn.ig_neurons(model, enc, jobs, clean, positions, steps=3)
    want = _reference(model, enc, jobs, 3)
    assert got.abs().max() > 0
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    routed = clean[1][0].view(N_EXPERTS, D_EXPERT).abs().sum(-1) > 0
    assert not got[0, 1].view(N_EXPERTS, D_EXPERT)[~routed].any(), "unrouted experts get no attribution"


def test_fine_contributions_add_up_to_the_moe_blocks_direct_effect():
    model = tiny_model("mixtral")  # no shared expert: the block's output is its experts' weighted sum
    report = km.diagnose(km.Sample(FACT), model, methods=["fine"], params={"fine": {"controls": 0}}, progress=False,
                         consensus=False)
    result = report.results["fine"]
    enc = model.encode(PROMPT, " Paris")
    with Hooks(model) as h:
        caps = [h.read(site(layer, "mlp.out")) for layer in range(model.n_layers)]
        model.forward(**enc.inputs())
    answer = model.unembedding[enc.target_ids[0]].detach()
    direct = [float(c.value[0, enc.target_positions[0]] @ answer) for c in caps]
    got = [d["score"] for d in result.findings["layer_scores"]]
    assert got == pytest.approx(direct, rel=1e-4, abs=1e-5)
    assert all("expert" in n for n in result.findings["neurons"])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_neuron_methods_name_their_expert(family):
    model = tiny_model(family)
    sample = km.Sample({**FACT, "prompts": [PROMPT, "The Eiffel Tower is in the city of"]})
    report = km.diagnose(sample, model, methods=["knowledge_neurons", "fine"], progress=False, consensus=False,
                         params={"knowledge_neurons": {"steps": 2, "controls": 2}, "fine": {"controls": 2}})
    for name, result in report.results.items():
        assert result.status == "ok", (name, result.error)
        listed = result.findings["neurons"] or result.findings.get("top_neurons", [])
        assert listed and all(0 <= n["expert"] < N_EXPERTS and 0 <= n["unit"] < D_EXPERT for n in listed), name


@pytest.fixture(scope="module")
def planted():
    return planted_moe()


def test_planted_moe_fact_and_routing(planted):
    model = planted.model
    layer, expert, _ = planted.expert
    for sample, answer, chosen in ((planted.sample, planted.answer_id, expert),
                                   (planted.other_sample, planted.other_answer_id, planted.other_expert[1])):
        enc = model.encode(sample["prompt"])
        with Hooks(model) as h:
            cap = h.read(site(layer, "moe.router"))
            logits = model.forward(**enc.inputs())
        assert int(logits[0, -1].argmax()) == answer
        picked = cap.value[0].topk(model.experts_per_token, -1).indices
        assert int(picked[-1, 0]) == chosen, "the last token goes to the subject's expert"
        assert not (picked[:-1] == chosen).any(), "and no other token does"


def test_planted_moe_is_found(planted):
    layer, expert, unit = planted.expert
    report = km.diagnose(planted.sample, planted.model, progress=False, consensus=False,
                         methods=["knowledge_neurons", "fine", "causal_tracing", "moe_routing"],
                         params={"knowledge_neurons": {"steps": 4}})
    for name in ("knowledge_neurons", "fine"):
        best = report.results[name].findings["neurons"][0]
        assert (best["layer"], best["expert"], best["unit"]) == (layer, expert, unit), name
        assert not best["generic"]
    tracing = report.results["causal_tracing"].findings
    assert tracing["peaks"]["mlp"]["layer"] == layer
    peak = tracing["experts"]["peak"]
    assert (peak["layer"], peak["expert"], peak["position"]) == (layer, expert, planted.last_position)
    assert any(s["kind"] == "expert" and s["site"] == expert_site(layer, expert, "out") for s in tracing["sites"])
    routing = report.results["moe_routing"].findings["routing"][layer]
    assert routing["last"][0]["expert"] == expert and routing["last"][0]["routed"]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_trace_over_the_prefix_cache_equals_whole_prompts(family):
    from knowmri.methods.expert_tracing import trace_experts
    from knowmri.methods.tracing_engine import subject_noise

    model = tiny_model(family)
    enc = model.encode(PROMPT, " Paris")
    ids = enc.input_ids[:, : enc.prompt_len]
    span = model.token_span(PROMPT, "Eiffel Tower")
    noise = subject_noise(model, 3, len(span), 0.3, 1)
    at = [span.stop - 1, enc.pred_pos]
    fast = trace_experts(model, ids, enc.pred_pos, enc.target_ids[0], span, noise, at, batch_size=8)
    slow = trace_experts(model, ids, enc.pred_pos, enc.target_ids[0], span, noise, at, batch_size=8, suffix=False)
    assert torch.allclose(fast.samples, slow.samples, atol=1e-5)
    assert (fast.grid != fast.low).any()


def test_dense_layers_of_a_moe_model_keep_their_mlp_neurons():
    """Qwen2-MoE with `mlp_only_layers`: dense layers' neurons have no expert, MoE layers' have one."""
    import copy

    import transformers as T

    base = tiny_model("qwen2_moe")
    config = copy.deepcopy(base.config)
    config.mlp_only_layers = [0]
    torch.manual_seed(0)
    hf = T.Qwen2MoeForCausalLM(config).eval()
    hf.config._name_or_path = "tiny-qwen2_moe-mixed"
    model = km.load_model(hf, tokenizer=base.tokenizer)
    assert model.moe_layers == (1, 2) and units.layer_width(model, 0) == config.intermediate_size
    report = km.diagnose(km.Sample(FACT), model, methods=["knowledge_neurons", "fine", "embedding_projection"],
                         params={"knowledge_neurons": {"steps": 2, "controls": 2}, "fine": {"controls": 2}},
                         progress=False, consensus=False)
    for name, result in report.results.items():
        assert result.status == "ok", (name, result.error)
        for n in result.findings["neurons"]:
            assert ("expert" in n) == (n["layer"] in model.moe_layers), (name, n)
