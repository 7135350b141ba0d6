"""Integrated gradients: the planted subject ranks first, equality with Captum, completeness (steps double
until it holds), every model kind, the Eiffel Tower fact and real known_1000 facts on SmolLM2."""

import json
from pathlib import Path

import pytest
import torch

import knowmri as km
from knowmri.methods.base import RunContext, get_method
from knowmri.methods.ig_engine import input_embedding_module, integrated_gradients, quadrature
from knowmri.methods.integrated_gradients import CACHE_KEY
from knowmri.testing import tiny_model

FACT = km.Sample(prompt="The Eiffel Tower is located in the city of", ground_truth=" Paris France",
                 triple_subject="Eiffel Tower")


def run(model, sample, ctx=None, **params):
    method = get_method("integrated_gradients")
    return method.run(model, sample, method.Params.from_dict(params), ctx or RunContext())


def test_planted_subject_ranks_first(planted):
    # The planted models are scale-invariant at their norms, so a zero baseline sees no path
    # signal; the pad token's embedding is the informative baseline here.
    result = run(planted.model, planted.sample, baseline="pad")
    top = result.findings["ranking"][0]
    assert top in planted.subject_span
    assert top == planted.neuron_position


def _captum_reference(model, enc, baseline, steps, method, batch):
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    embed = input_embedding_module(model)
    rows = []
    for pos, tid in zip(enc.target_positions, enc.target_ids):
        def kwargs(n):
            out = {"attention_mask": enc.attention_mask.repeat(n, 1), "use_cache": False}
            if enc.decoder_input_ids is not None:
                out["decoder_input_ids"] = enc.decoder_input_ids.repeat(n, 1)
            return out

        if baseline == "pad":
            def fwd(ids, pos=pos, tid=tid):
                return model.hf_model(input_ids=ids, **kwargs(ids.shape[0])).logits[:, pos].float().softmax(-1)[:, tid]

            base = torch.full_like(enc.input_ids, model.tokenizer.pad_token_id)
            att = LayerIntegratedGradients(fwd, embed).attribute(enc.input_ids, baselines=base, n_steps=steps,
                                                                 method=method, internal_batch_size=batch)
        else:
            def fwd(emb, pos=pos, tid=tid):
                return model.hf_model(inputs_embeds=emb, **kwargs(emb.shape[0])).logits[:, pos].float().softmax(-1)[:, tid]

            x = embed(enc.input_ids).detach()
            att = IntegratedGradients(fwd).attribute(x, baselines=torch.zeros_like(x), n_steps=steps, method=method,
                                                     internal_batch_size=batch)
        rows.append(att.sum(-1)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("family,baseline,method", [("gpt2", "pad", "gausslegendre"), ("llama", "zero", "gausslegendre"),
                                                    ("llama", "pad", "riemann_trapezoid"), ("t5", "pad", "gausslegendre")])
def test_equals_captum(family, baseline, method):
    model = tiny_model(family)
    enc = model.encode(FACT["prompt"], FACT["ground_truth"])
    ours = integrated_gradients(model, enc, steps=7, baseline=baseline, method=method, internal_batch_size=5)
    ref = _captum_reference(model, enc, baseline, 7, method, 5)
    assert ours["attributions"].shape == ref.shape
    torch.testing.assert_close(ours["attributions"], ref.float(), rtol=1e-4, atol=1e-9)


def test_quadrature_matches_captum():
    from captum.attr._utils.approximation_methods import approximation_parameters

    for method in ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"):
        sizes, alphas = approximation_parameters(method)
        ours = quadrature(method, 9)
        assert ours[0] == pytest.approx(sizes(9)) and ours[1] == pytest.approx(alphas(9))


def test_completeness_with_many_steps():
    model = tiny_model("gpt2")
    enc = model.encode(FACT["prompt"], " Paris")
    few = integrated_gradients(model, enc, steps=2, objective="logprob")
    many = integrated_gradients(model, enc, steps=64, objective="logprob", internal_batch_size=64)

    def gap(out):
        delta = out["f_input"] - out["f_baseline"]
        return float(((out["attributions"].sum(-1) - delta).abs() / delta.abs()).max())

    assert gap(many) < 1e-3
    assert gap(many) < gap(few)


def test_findings_and_cache():
    model = tiny_model("llama")  # its tokenizer puts <bos> first
    ctx = RunContext()
    result = run(model, FACT, ctx, steps=4)
    f = result.findings
    scores = f["token_scores"]
    assert [t["index"] for t in scores] == list(range(len(scores)))
    assert scores[0]["special"] and not any(t["special"] for t in scores[1:])
    assert 0 not in f["ranking"]
    assert len(f["answer_token_scores"]) == 2 == len(f["completeness_gaps"])
    per_answer = torch.tensor([a["scores"][: len(scores)] for a in f["answer_token_scores"]])
    torch.testing.assert_close(per_answer.sum(0), torch.tensor([t["score"] for t in scores]))
    assert ctx.cache[CACHE_KEY] == scores
    assert {"completeness_gap", "completeness_gap_relative", "subject_share"} <= set(f)
    assert [fig["name"] for fig in result.figures] == ["Attribution per input token", "Attribution per answer token"]


@pytest.mark.parametrize("family", ["bert", "t5", "opt", "falcon"])
def test_other_kinds(family):
    model = tiny_model(family)
    result = run(model, FACT, steps=3)
    n_tokens = len(result.findings["token_scores"])
    enc = model.encode(FACT["prompt"], FACT["ground_truth"])
    assert n_tokens == (enc.prompt_len if model.kind == "causal" else enc.input_ids.shape[1])


def test_bad_params():
    method = get_method("integrated_gradients")
    for bad in ({"steps": 0}, {"baseline": "mean"}, {"method": "simpson"}, {"objective": "logit"}, {"max_steps": 0},
                {"tolerance": 0}):
        with pytest.raises(ValueError):
            method.Params.from_dict(bad)


def test_steps_double_until_complete_and_reuse_points():
    model = tiny_model("gpt2")
    enc = model.encode(FACT["prompt"], " Paris")
    out = integrated_gradients(model, enc, steps=2, method="riemann_right", max_steps=256, tolerance=0.01)
    steps = [n for n, _ in out["history"]]
    assert steps[0] == 2 and all(b == 2 * a for a, b in zip(steps, steps[1:])) and out["steps"] == steps[-1]
    assert out["history"][-1][1] <= 0.01 < out["history"][0][1]
    assert out["points"] == out["steps"]  # the right rule's points at n are among those at 2n: none recomputed
    fixed = integrated_gradients(model, enc, steps=out["steps"], method="riemann_right")
    torch.testing.assert_close(out["attributions"], fixed["attributions"], rtol=1e-4, atol=1e-7)
    gl = integrated_gradients(model, enc, steps=2, method="gausslegendre", max_steps=8, tolerance=1e-9)
    assert [n for n, _ in gl["history"]] == [2, 4, 8] and gl["points"] == 2 + 4 + 8  # Gauss-Legendre nodes do not nest


def test_stopped_short_is_a_warning():
    model = tiny_model("gpt2")
    sample = km.Sample(prompt=FACT["prompt"], ground_truth=" Paris", triple_subject="Eiffel Tower")
    result = run(model, sample, steps=2, max_steps=4, tolerance=1e-6)
    f = result.findings
    assert f["steps"] == 4 and [h["steps"] for h in f["steps_history"]] == [2, 4]
    assert "stopped short" in f["warnings"][0] and "stopped short" in result.summary
    # The subject's share is read against its share of the tokens.
    assert f["subject_token_share"] == pytest.approx(len(range(*f["subject_span"])) / len(f["token_scores"]))
    assert f["subject_dominance"] == pytest.approx(f["subject_share"] / f["subject_token_share"])
    assert "its share of tokens" in result.summary


def test_estimate_counts_the_expected_doubling():
    from knowmri.methods.integrated_gradients import ADAPTIVE_POINTS, IntegratedGradientsParams, expected_points

    P = IntegratedGradientsParams
    assert expected_points(P(steps=20, max_steps=20)) == 20  # no doubling allowed
    assert expected_points(P(steps=20, max_steps=160)) == round(ADAPTIVE_POINTS * 20)
    assert expected_points(P(steps=20, max_steps=40)) <= 40  # never beyond what the doubling reaches
    assert expected_points(P(steps=20, max_steps=160, method="gausslegendre")) > expected_points(P(steps=20, max_steps=160))
    model = tiny_model("gpt2")
    method = get_method("integrated_gradients")
    sample = km.Sample(prompt=FACT["prompt"], ground_truth=" Paris")
    fixed, adaptive = (method.estimate(model, sample, P(steps=20, max_steps=m)) for m in (20, 160))
    assert adaptive.seconds > fixed.seconds

KNOWN_1000 = Path("/work/shared/data/known_1000/known_1000.json")


@pytest.mark.smollm2
def test_smollm2_real_facts_are_complete(smollm2):
    if not KNOWN_1000.is_file():
        pytest.skip("the real known_1000 file is not in /work/shared/data")
    records = {r["subject"]: r for r in json.loads(KNOWN_1000.read_text())}
    for subject in ("Marshall Islands", "Rhine"):  # 7% and 15% short at 20 steps of the right rule
        r = records[subject]
        f = run(smollm2, km.Sample(prompt=r["prompt"], ground_truth=" " + r["attribute"], triple_subject=subject)).findings
        assert f["completeness_gap_relative"] <= 0.05 and "warnings" not in f
        assert f["steps"] == 40 and f["gradient_points"] == 40
        assert 0 < f["subject_token_share"] < 1 and f["subject_dominance"] > 0


@pytest.mark.smollm2
def test_smollm2_eiffel_subject_dominates(smollm2):
    sample = km.Sample(prompt="The Eiffel Tower is located in the city of", ground_truth=" Paris",
                       triple_subject="Eiffel Tower")
    result = run(smollm2, sample, steps=16)
    f = result.findings
    assert f["ranking"][0] in range(*f["subject_span"])
    assert f["subject_share"] > 0.4
    assert "subject" in result.summary


def test_several_inputs_together_equal_one_at_a_time():
    """`integrated_gradients_many` (a dataset run's batches): each input's steps, points and attributions are its own."""
    from knowmri.methods.common import prepare
    from knowmri.methods.ig_engine import PathIntegral, compute_together, integrated_gradients_many

    model = tiny_model("llama")
    facts = km.load_dataset("known_1000")
    encs = [prepare(model, facts[i]).enc for i in range(6)]
    lengths = [e.input_ids.shape[1] for e in encs]
    assert 1 in [lengths.count(n) for n in lengths] and max(lengths.count(n) for n in lengths) > 1  # some share a batch
    options = {"steps": 4, "method": "riemann_right", "max_steps": 32, "tolerance": 0.01}
    for enc, together in zip(encs, integrated_gradients_many(model, encs, **options)):
        alone = integrated_gradients(model, enc, **options)
        assert together["steps"] == alone["steps"] and together["points"] == alone["points"]
        torch.testing.assert_close(together["attributions"], alone["attributions"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(together["f_input"], alone["f_input"])
    short, long = encs[lengths.index(min(lengths))], encs[lengths.index(max(lengths))]
    paths = [PathIntegral(model, e) for e in (short, long)]
    compute_together(model, paths, [[0.5, 1.0], [0.5, 1.0]], batch=3)  # the shorter input padded on the right
    for path, enc in zip(paths, (short, long)):
        own = PathIntegral(model, enc)
        own.compute([0.5, 1.0])
        for alpha in (0.5, 1.0):
            torch.testing.assert_close(path.points[path.key(alpha)], own.points[own.key(alpha)], rtol=1e-5, atol=1e-8)
