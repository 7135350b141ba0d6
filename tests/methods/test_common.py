"""The shared clean pass (`knowmri.methods.common.clean_pass`): one forward per model, input and weights
within a diagnosis, reused by the light methods, never reused for another prompt, answer, model or weights."""

from __future__ import annotations

import contextlib

import pytest
import torch

import knowmri as km
from knowmri.hooks import Hooks, site
from knowmri.methods.base import RunContext, get_method
from knowmri.methods.common import clean_pass, prepare
from knowmri.testing import FAMILIES, build_tiny, tiny_model

FACT = {"prompt": "The Eiffel Tower is located in the city of", "ground_truth": " Paris", "triple_subject": "Eiffel Tower"}
OTHER = {"prompt": "The Colosseum is located in the city of", "ground_truth": " Rome", "triple_subject": "Colosseum"}
LIGHT = ["logit_lens", "fine", "embedding_projection"]


@contextlib.contextmanager
def counting(model):
    """Counts the forward passes of the wrapped Hugging Face model."""
    calls = []
    handle = model.hf_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def run(name, model, sample, ctx, **params):
    method = get_method(name)
    return method.run(model, km.Sample(sample), method.Params.from_dict(params), ctx)


def test_one_forward_for_the_light_methods_of_one_diagnosis():
    model = tiny_model("llama")
    with counting(model) as calls:
        # FiNE's generic-neuron screen (its own batched pass over control facts) is off here
        report = km.diagnose(km.Sample(FACT), model, methods=LIGHT, progress=False, consensus=False,
                             params={"fine": {"controls": 0}})
    assert all(r.status == "ok" for r in report.results.values())
    assert len(calls) == 1
    for name in LIGHT:  # the same findings as a standalone run (its own, fresh context)
        alone = run(name, model, FACT, RunContext(), **({"controls": 0} if name == "fine" else {}))
        assert alone.findings == report.results[name].findings


def test_attention_weights_runs_its_own_eager_pass():
    model = tiny_model("llama")
    with counting(model) as calls:
        km.diagnose(km.Sample(FACT), model, methods=[*LIGHT, "attention_weights"], progress=False, consensus=False,
                    params={"fine": {"controls": 0}})
    assert len(calls) == 2


def test_not_reused_across_prompts_or_answers():
    model = tiny_model("llama")
    ctx = RunContext()
    with counting(model) as calls:
        first = run("logit_lens", model, FACT, ctx).findings
        other = run("logit_lens", model, OTHER, ctx).findings
        assert len(calls) == 2
        assert other["target"] == " Rome" and other["target_prob"] != first["target_prob"]
        run("fine", model, FACT, ctx, controls=0)
        run("fine", model, OTHER, ctx, controls=0)
        assert len(calls) == 2  # both passes are kept
        run("logit_lens", model, {**FACT, "ground_truth": " Lyon"}, ctx)  # another answer: other input ids
        assert len(calls) == 3
    assert other == run("logit_lens", model, OTHER, RunContext()).findings


def test_not_reused_across_models_or_edited_weights():
    model = build_tiny("llama")
    twin = build_tiny("llama", seed=1)
    ctx = RunContext()
    enc = model.encode(FACT["prompt"], FACT["ground_truth"])
    with counting(model) as calls, counting(twin) as twin_calls:
        a = clean_pass(model, enc, ctx)
        b = clean_pass(twin, enc, ctx)
        assert len(calls) == len(twin_calls) == 1
        assert not torch.equal(a.logits, b.logits)
        assert clean_pass(model, enc, ctx) is a
        with torch.no_grad():
            model.hf_model.lm_head.weight.mul_(2.0)  # edited in place: the cached pass is stale
        c = clean_pass(model, enc, ctx)
        assert len(calls) == 2 and c is not a
        torch.testing.assert_close(c.logits, 2 * a.logits, rtol=1e-4, atol=1e-5)


def test_other_positions_run_the_pass_again_and_cover_both():
    model = tiny_model("llama")
    ctx = RunContext()
    enc = model.encode(FACT["prompt"], FACT["ground_truth"])
    with counting(model) as calls:
        first = clean_pass(model, enc, ctx)
        assert first.positions == enc.target_positions
        wider = clean_pass(model, enc, ctx, positions=[2])
        assert len(calls) == 2 and wider.positions == sorted({2, *enc.target_positions})
        assert clean_pass(model, enc, ctx, positions=[2]) is wider
        assert clean_pass(model, enc, ctx) is wider
        assert len(calls) == 2


def test_prediction_pass_is_shared_without_a_ground_truth():
    model = tiny_model("llama")
    ctx = RunContext()
    with counting(model) as calls:
        findings = run("logit_lens", model, {"prompt": FACT["prompt"]}, ctx).findings
        run("fine", model, {"prompt": FACT["prompt"]}, ctx, controls=0)
    assert len(calls) == 1
    assert findings["answer_source"] == "model prediction" and findings["target_rank"][-1] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_clean_pass_matches_hooked_forward(family):
    model = tiny_model(family)
    enc = prepare(model, km.Sample(FACT)).enc
    clean = clean_pass(model, enc)
    positions = clean.positions
    with torch.no_grad(), Hooks(model) as h:
        resid = [h.read(site(layer, "resid_post")) for layer in range(model.n_layers)]
        neurons = [h.read(site(layer, "mlp.neurons"), positions=positions) for layer in range(model.n_layers)]
        logits = model.forward(**enc.inputs())[0, positions]
    for layer in range(model.n_layers):
        torch.testing.assert_close(clean.resid[layer], resid[layer].value[0])
        torch.testing.assert_close(clean.neurons[layer], neurons[layer].value[0])
    torch.testing.assert_close(clean.logits, logits, rtol=1e-4, atol=1e-5)
    assert clean.rows([enc.pred_pos]) == [positions.index(enc.pred_pos)]


def test_weight_derived_values_follow_in_place_edits():
    from knowmri.methods.weight_cache import weight_derived

    weight = torch.nn.Parameter(torch.ones(3, 2))
    calls = []

    def norms(w):
        calls.append(1)
        return w.norm(dim=-1)

    first = weight_derived(weight, "norms", norms)
    assert weight_derived(weight, "norms", norms) is first and len(calls) == 1
    with torch.no_grad():
        weight.mul_(2.0)
    torch.testing.assert_close(weight_derived(weight, "norms", norms), 2 * first)
    assert len(calls) == 2


def test_clean_passes_of_a_batch_fill_each_sample_cache_with_its_own_pass():
    """A dataset run's batched clean pass: afterwards `clean_pass` reads each input's own pass from its cache."""
    from knowmri.methods.common import clean_passes

    model = tiny_model("gpt2")
    facts = km.load_dataset("known_1000")
    encs = [prepare(model, facts[i]).enc for i in (0, 1, 2)]
    assert len({e.input_ids.shape[1] for e in encs}) > 1  # padded on the right
    contexts = [RunContext() for _ in encs]
    clean_passes(model, encs, contexts)
    for enc, ctx in zip(encs, contexts):
        assert len(ctx.cache) == 1
        cached = clean_pass(model, enc, ctx, heads=True)
        fresh = clean_pass(model, enc, heads=True)
        rows = cached.rows(fresh.positions)
        torch.testing.assert_close(cached.resid, fresh.resid, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached.neurons[:, rows], fresh.neurons, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached.heads[:, rows], fresh.heads, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached.logits[rows], fresh.logits, rtol=1e-5, atol=1e-5)
        assert clean_pass(model, enc, ctx, positions=range(enc.input_ids.shape[1])) is cached


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma", "gemma3"])
def test_embedding_std_is_that_of_the_module_output(family):
    """The noise unit is the std of what the embedding module outputs (where the noise is added): Gemma
    scales its rows by sqrt(d_model), and the weight's std would make the noise that much too weak."""
    from knowmri.methods.weight_cache import embedding_std

    model = tiny_model(family)
    weight = model.embed_module.weight.detach().double()
    scale = float(getattr(model.embed_module, "embed_scale", 1.0))
    assert (scale > 1) == family.startswith("gemma")
    assert embedding_std(model) == pytest.approx(scale * float(weight.std()), rel=1e-4)
