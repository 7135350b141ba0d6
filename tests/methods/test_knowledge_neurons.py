"""knowledge_neurons: the planted neurons are found (at the subject, and the "recall" variant's at
the answer position with default settings), batched IG equals the per-layer loop, every family
runs, refinement across paraphrases, multi-token answers, and a causal check on SmolLM2."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from knowmri.hooks import Hooks, site
from knowmri.methods import kn_engine as kn
from knowmri.methods import neuron_readouts as nr
from knowmri.methods.base import RunContext, get_method
from knowmri.sample import Sample
from knowmri.testing import planted_model, tiny_model
from knowmri.testing.kn_reference import ig_neurons_reference

PROMPT = "The Eiffel Tower is located in the city of"
PARAPHRASES = ["The Eiffel Tower is in the city of", "Where is the Eiffel Tower? It is in the city of",
               "In the city of the Eiffel Tower? The capital of"]


def run(model, sample, **params):
    method = get_method("knowledge_neurons")
    return method.run(model, sample, method.Params.from_dict(params), RunContext())


@pytest.mark.parametrize("positions", ["subject", "all"])
def test_planted_neuron_ranks_first(planted, positions) -> None:
    result = run(planted.model, planted.sample, steps=8, positions=positions)
    first = result.findings["neurons"][0]
    assert (first["layer"], first["unit"]) == planted.neuron
    top = result.findings["prompts"][0]["top"][0]
    assert top["position"] == planted.neuron_position and top["token"].strip() == "Tower"


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_recall_neuron_ranks_first_at_default_settings(style) -> None:
    """In the "recall" planted model a neuron at the last position writes the answer (after a head
    copied the subject there): the paper's own setting (position, threshold, p) ranks it first."""
    planted = planted_model(style, variant="recall")
    result = run(planted.model, planted.sample, steps=8)
    f = result.findings
    assert (f["neurons"][0]["layer"], f["neurons"][0]["unit"]) == planted.neuron
    assert (f["top_neurons"][0]["layer"], f["top_neurons"][0]["unit"]) == planted.neuron
    assert f["prompts"][0]["positions"] == [planted.neuron_position]
    assert f["neurons"][0]["top_tokens"][0].strip() == "Paris"
    assert f["neurons"][0]["score"] > 10 * max(abs(n["score"]) for n in f["top_neurons"][1:])


def test_answer_position_only_sees_what_is_there(planted) -> None:
    """At the paper's position (the one predicting the answer) the planted neuron is silent:
    the fact is stored at the subject, so its attribution there is ~0."""
    result = run(planted.model, planted.sample, steps=4)
    scores = {(n["layer"], n["unit"]): n["score"] for n in result.findings["top_neurons"]}
    assert scores.get(planted.neuron, 0.0) < 1e-6


def test_refinement_keeps_the_shared_neurons(planted) -> None:
    sample = planted.sample.replace(prompts=PARAPHRASES)
    result = run(planted.model, sample, steps=4, positions="subject", threshold=0.0, p=0.7)
    f = result.findings
    assert f["n_prompts"] == 4 and len(f["prompts"]) == 4
    assert all(d["probabilities"][0] > 0.9 for d in f["prompts"])
    first = f["neurons"][0]
    assert (first["layer"], first["unit"]) == planted.neuron and first["prompts"] == 4
    assert all(n["prompts"] >= 3 for n in f["neurons"])  # >= 0.7 x 4 prompts
    assert len(f["neurons"]) < min(d["n_coarse"] for d in f["prompts"])


def test_refine_and_threshold_rules() -> None:
    a = torch.tensor([[1.0, 0.3, 0.1], [0.0, -2.0, 0.25]])
    assert kn.coarse_neurons(a, 0.2).tolist() == [[True, True, False], [False, False, True]]
    assert not kn.coarse_neurons(-a.abs(), 0.2).any()
    masks = [torch.tensor([True, True, False]), torch.tensor([True, False, False]), torch.tensor([True, True, True])]
    kept, counts = kn.refine(masks, 0.7)
    assert counts.tolist() == [3, 2, 1] and kept.tolist() == [True, False, False]
    kept, _ = kn.refine(masks, 0.5)
    assert kept.tolist() == [True, True, False]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "opt", "falcon", "bert", "t5"])
@pytest.mark.parametrize("mode", ["answer", "all"])
def test_batched_equals_per_layer_loop(family, mode) -> None:
    model = tiny_model(family)
    enc = model.encode(PROMPT, " Paris France")
    pairs = nr.answer_tokens(model, enc)
    jobs, positions = kn.ig_jobs(model, enc, pairs, mode)
    if mode == "all":
        jobs = jobs[-4:]
        positions = sorted({q for q, _, _ in jobs})
    clean, _ = nr.clean_neurons(model, enc, positions)
    reference = ig_neurons_reference(model, enc, jobs, steps=3)
    assert reference.abs().max() > 0
    for batch in (0, 3, 7):  # all layers in one batch, one layer per batch, uneven chunks
        batched = kn.ig_neurons(model, enc, jobs, clean, positions, steps=3, batch_size=batch)
        torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-9)


def test_linspace_riemann_matches_eleutherai_points(tiny) -> None:
    assert kn.alphas(5, "linspace").tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert kn.alphas(4, "right").tolist() == [0.25, 0.5, 0.75, 1.0]
    model = tiny("llama")
    enc = model.encode(PROMPT, " Paris")
    jobs, positions = kn.ig_jobs(model, enc, nr.answer_tokens(model, enc), "answer")
    clean, _ = nr.clean_neurons(model, enc, positions)
    torch.testing.assert_close(kn.ig_neurons(model, enc, jobs, clean, positions, steps=4, riemann="linspace"),
                               ig_neurons_reference(model, enc, jobs, steps=4, riemann="linspace"), rtol=1e-4, atol=1e-9)


def test_multi_token_answer_is_teacher_forced_at_its_own_positions(tiny) -> None:
    model = tiny("gpt2")
    enc = model.encode(PROMPT, " Paris France")
    (p0, t0), (p1, t1) = nr.answer_tokens(model, enc)
    assert p1 == p0 + 1 and int(enc.input_ids[0, p1]) == t0  # the ground truth is fed, not the greedy token
    result = run(model, Sample(prompt=PROMPT, ground_truth=" Paris France"), steps=3, top_k=5)
    detail = result.findings["prompts"][0]
    assert detail["positions"] == [p0, p1] and [t.strip() for t in detail["answer_tokens"]] == ["Paris", "France"]
    per_token = ig_neurons_reference(model, enc, [(p0, p0, t0), (p1, p1, t1)], steps=3)
    torch.testing.assert_close(torch.as_tensor(result.arrays["attributions"]), per_token.sum(0), rtol=1e-4, atol=1e-9)


def test_runs_on_every_family(tiny_family_model) -> None:
    model = tiny_family_model
    result = run(model, Sample(prompt=PROMPT, ground_truth=" Paris", prompts=["The Eiffel Tower is in"]), steps=2, top_k=5)
    f = result.findings
    assert result.summary and len(result.figures) == 2
    assert len(result.tables) == (3 if f["generic_neurons"] else 2)  # generic neurons get a table of their own
    assert len(f["layer_scores"]) == model.n_layers and f["n_prompts"] == 2
    scores = [n["score"] for n in f["neurons"]]
    assert scores == sorted(scores, reverse=True)
    assert all({"layer", "unit", "score"} <= set(n) for n in f["neurons"] + f["top_neurons"])
    assert all(0 <= n["layer"] < model.n_layers and 0 <= n["unit"] < model.d_mlp for n in f["top_neurons"])
    assert f["top_neurons"][0]["top_tokens"]
    json.dumps(result.to_dict())


def test_params_are_validated() -> None:
    params = get_method("knowledge_neurons").Params
    assert params().steps == 20 and params().threshold == 0.2
    for bad in ({"steps": 0}, {"threshold": 1.5}, {"p": 0}, {"riemann": "left"}, {"positions": "middle"}):
        with pytest.raises(ValueError):
            params.from_dict(bad)


def test_subject_positions_need_a_subject(tiny) -> None:
    with pytest.raises(ValueError, match="subject"):
        run(tiny("gpt2"), Sample(prompt=PROMPT, ground_truth=" Paris"), steps=2, positions="subject")


def _p_paris(model, enc, answer_id, ablate=()):
    with torch.no_grad(), Hooks(model) as h:
        for layer, unit in ablate:
            h.ablate(site(layer, "mlp.neurons"), positions=[enc.pred_pos], units=[unit])
        return float(model.forward(**enc.inputs())[0, enc.pred_pos].softmax(-1)[answer_id])


@pytest.mark.smollm2
def test_smollm2_eiffel_tower_top_neurons_matter(smollm2) -> None:
    sample = Sample(prompt=PROMPT, ground_truth=" Paris", triple_subject="Eiffel Tower")
    result = run(smollm2, sample, steps=4, top_k=10)
    f = result.findings
    assert f["neurons"] and f["top_neurons"][0]["top_tokens"]
    scores = [n["score"] for n in f["top_neurons"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    top5 = [(n["layer"], n["unit"]) for n in f["top_neurons"][:5]]
    enc = smollm2.encode(PROMPT, " Paris")
    answer = enc.target_ids[0]
    clean = _p_paris(smollm2, enc, answer)
    drop_kn = clean - _p_paris(smollm2, enc, answer, top5)
    gen = torch.Generator().manual_seed(0)
    drops = []
    for _ in range(5):
        random5 = [(layer, int(torch.randint(smollm2.d_mlp, (1,), generator=gen))) for layer, _ in top5]
        drops.append(clean - _p_paris(smollm2, enc, answer, random5))
    assert drop_kn > 0.1 and drop_kn > max(drops)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_all_positions_on_masked_and_seq2seq(tiny, family) -> None:
    model = tiny(family)
    result = run(model, Sample(prompt=PROMPT, ground_truth=" Paris"), steps=2, positions="all", top_k=3)
    top = result.findings["prompts"][0]["top"][0]
    assert "position" in top and isinstance(top["token"], str)


def _ig_setup(model, mode="answer"):
    enc = model.encode(PROMPT, " Paris France")
    jobs, positions = kn.ig_jobs(model, enc, nr.answer_tokens(model, enc), mode)
    if mode == "all":
        jobs = jobs[:1] + jobs[-2:]  # position 0 (no prefix) and the last ones
        positions = sorted({q for q, _, _ in jobs})
    clean, _ = nr.clean_neurons(model, enc, positions)
    return enc, jobs, positions, clean


def test_rows_start_at_their_own_block_on_every_family(tiny_family_model) -> None:
    """The rows of layer l enter at block l (fed the clean residual stream, over the clean prefix's
    keys/values on causal models), on every family, and give the per-layer loop's attributions."""
    model = tiny_family_model
    enc, jobs, positions, clean = _ig_setup(model, "all")
    for q, p, _ in jobs:
        direct = kn._Direct(model, enc, q, p)
        assert direct.runner is not None, "direct block calls were rejected by their check"
        if model.kind == "causal":
            assert direct.fed == (p - q + 1 if q > 0 else p + 1)  # only the positions after the prefix
    reference = ig_neurons_reference(model, enc, jobs, steps=3)
    for batch in (0, 3):
        torch.testing.assert_close(kn.ig_neurons(model, enc, jobs, clean, positions, steps=3, batch_size=batch),
                                   reference, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
def test_whole_forward_fallback_equals_the_loop(family, monkeypatch) -> None:
    """Where the direct block calls fail their check, every row runs the whole model (`_Rows`)."""
    model = tiny_model(family)
    enc, jobs, positions, clean = _ig_setup(model)
    reference = ig_neurons_reference(model, enc, jobs, steps=3)
    monkeypatch.setattr(kn._StartRunner, "check", lambda self, *args: setattr(self, "direct", False))
    assert kn._Direct(model, enc, jobs[0][0], jobs[0][1]).runner is None
    torch.testing.assert_close(kn.ig_neurons(model, enc, jobs, clean, positions, steps=3, batch_size=7), reference,
                               rtol=1e-4, atol=1e-9)


def test_rows_skip_the_blocks_before_their_layer(monkeypatch) -> None:
    """Fewer FLOPs than running every row through every block (the fallback), same attributions."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model("llama")
    enc, jobs, positions, clean = _ig_setup(model)

    def count() -> tuple[float, torch.Tensor]:
        with FlopCounterMode(display=False) as counter:
            out = kn.ig_neurons(model, enc, jobs, clean, positions, steps=4)
        return counter.get_total_flops(), out

    direct, a = count()
    monkeypatch.setattr(kn._StartRunner, "check", lambda self, *args: setattr(self, "direct", False))
    whole, b = count()
    assert direct < whole
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("case", ["random", "near-ties", "wide"])
def test_top_vocabulary_equals_the_float32_product(dtype, case, monkeypatch) -> None:
    """The low-precision shortlist, rescored in float32, gives the top tokens of the float32 product of the
    same (rounded) weights: on random rows, on rows whose best tokens differ by less than the dtype can
    resolve, and with a shortlist cap so small that every row is scored in full."""
    gen = torch.Generator().manual_seed(0)
    unembed = torch.randn(3000, 64, generator=gen).to(dtype)
    vectors = torch.randn(12, 64, generator=gen)
    if case == "near-ties":  # eight tokens nearly parallel to the first row: their products differ by ~1e-4
        base = vectors[0] / vectors[0].norm()
        for j in range(8):
            unembed[100 + j] = (base * 3 + 1e-4 * j * torch.randn(64, generator=gen)).to(dtype)
    if case == "wide":  # and vocabulary blocks smaller than the vocabulary
        monkeypatch.setattr(nr, "SHORTLIST_MAX", 1)
        monkeypatch.setattr(nr, "_chunked_top", functools.partial(nr._chunked_top, chunk=700))
    want = (vectors @ unembed.float().T).topk(5, dim=-1)
    got = nr.top_vocabulary(unembed, vectors, 5)
    scores = vectors @ unembed.float().T
    assert torch.allclose(scores.gather(1, got), want.values, rtol=0, atol=1e-5)  # the same scores, best first
    if case != "near-ties":
        assert torch.equal(got, want.indices)
