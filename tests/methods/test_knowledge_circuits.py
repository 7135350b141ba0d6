"""Knowledge circuits: the planted route is the circuit, EAP scores equal an independent
computation of (corrupted - clean) . gradient, EAP-IG's batch equals its steps one by one,
every causal family (sequential, parallel, grouped-query), the noise fallback, SmolLM2."""

from pathlib import Path

import pytest
import torch

import knowmri as km
from knowmri.hooks import Hooks, site
from knowmri.methods import circuits_corruption, circuits_engine, circuits_search
from knowmri.methods.base import RunContext, get_method
from knowmri.methods.circuits_engine import answer_metric, edge_attribution, forward_logits, node_names, prune
from knowmri.testing import FAMILIES, build_tiny, tiny_model

PROMPT = "The Eiffel Tower is located in the city of"
FACT = km.Sample(prompt=PROMPT, ground_truth=" Paris", triple_subject="Eiffel Tower")
KNOWN_1000 = Path("/work/shared/data/known_1000/known_1000.json")
CAUSAL = [f for f in FAMILIES if f not in ("bert", "t5")]


def run(model, sample=FACT, **params):
    method = get_method("knowledge_circuits")
    return method.run(model, sample, method.Params.from_dict(params), RunContext())


def without_target_new(sample):
    """The planted sample without its CounterFact contrast (so the contrast is the corrupted run's answer)."""
    return km.Sample({k: v for k, v in dict(sample).items() if k != "target_new"})


def test_planted_route_is_the_circuit(planted):
    (nl, _), (hl, hh) = planted.neuron, planted.head
    head, mlp = f"a{hl}.h{hh}", f"m{nl}"
    route = {("input", mlp), (mlp, head), (head, "logits")}
    other = planted.other_sample["triple_subject"]
    f = run(planted.model, without_target_new(planted.sample), corrupt_subject=other, top_n=10, ig_steps=20).findings
    top3 = sorted(f["edges"], key=lambda e: -abs(e["score"]))[:3]
    assert {(e["src"], e["dst"]) for e in top3} == route
    assert all(e["score"] < 0 for e in top3)  # corrupting them lowers the logit difference
    assert {head, mlp} <= {n["name"] for n in f["nodes"]}
    assert f["corruption"]["kind"] == "counterfactual" and f["contrast_subject"] == other
    assert f["corrupted_answer"] == f["contrast_answer"] == planted.model.tokenizer.decode([planted.other_answer_id])
    assert f["metric_clean"] > 0 > f["metric_corrupted"]
    # EAP-IG is complete along the input path: the input's edges add up to the metric's change
    assert f["linear_estimate"] == pytest.approx(f["metric_corrupted"] - f["metric_clean"], rel=0.1)
    assert f["faithfulness"]["recovered"] == pytest.approx(1.0, abs=0.05)


def test_default_settings_keep_the_route(planted):
    (nl, _), (hl, hh) = planted.neuron, planted.head
    head, mlp = f"a{hl}.h{hh}", f"m{nl}"
    f = run(planted.model, without_target_new(planted.sample), top_n=10).findings  # picks its own corrupting subject
    edges = {(e["src"], e["dst"]) for e in f["edges"]}
    assert {("input", mlp), (mlp, head), (head, "logits")} <= edges
    assert {(e["src"], e["dst"]) for e in f["edges"][:2]} == {(mlp, head), (head, "logits")}


def test_plain_eap_finds_the_head(planted):
    (_, _), (hl, hh) = planted.neuron, planted.head
    f = run(planted.model, planted.sample, method="eap", top_n=5).findings  # picks its own corrupting subject
    assert (f["top_edges"][0]["src"], f["top_edges"][0]["dst"]) == (f"a{hl}.h{hh}", "logits")


def _deltas_and_grad_inputs(model, clean, corrupt):
    """Independent clean and corrupted runs: each node's output, read one site at a time."""
    out = {}
    for name, ids in (("clean", clean), ("corrupt", corrupt)):
        with torch.no_grad(), Hooks(model) as h:
            caps = {"input": h.read(site(0, "resid_pre"))}
            for layer in range(model.n_layers):
                caps[f"z{layer}"] = h.read(site(layer, "attn.heads"))
                caps[f"m{layer}"] = h.read(site(layer, "mlp.out"))
            model.forward(input_ids=ids)
        out[name] = {k: c.value[0] for k, c in caps.items()}
    delta = {"input": out["corrupt"]["input"] - out["clean"]["input"]}
    for layer in range(model.n_layers):
        w = model.linear_weight(model.component(layer, "attn_o")).detach()
        dz = out["corrupt"][f"z{layer}"] - out["clean"][f"z{layer}"]
        for h in range(model.n_heads):
            sl = slice(h * model.d_head, (h + 1) * model.d_head)
            delta[f"a{layer}.h{h}"] = dz[:, h] @ w[:, sl].T
        delta[f"m{layer}"] = out["corrupt"][f"m{layer}"] - out["clean"][f"m{layer}"]
    return delta


def _grad_through(model, clean, answer, wrong, inject):
    """d metric / d delta, where `inject(delta)` installs hooks adding delta to one reader's private input."""
    delta = torch.zeros(clean.shape[1], model.d_model, dtype=model.dtype, requires_grad=True)
    handles = inject(delta)
    try:
        value = answer_metric(forward_logits(model, clean), answer, wrong, "logit_diff")[0]
        (grad,) = torch.autograd.grad(value, delta)
    finally:
        for handle in handles:
            handle.remove()
    return grad


def _setup(family):
    model = build_tiny(family)
    model.hf_model.double()
    clean = model.encode(PROMPT).input_ids
    corrupt = model.encode(PROMPT.replace("Eiffel Tower", "Big Ben")).input_ids
    assert clean.shape == corrupt.shape
    answer = model.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    wrong = model.tokenizer(" London", add_special_tokens=False)["input_ids"][0]
    graph = edge_attribution(model, clean, corrupt, answer, wrong, alphas=[1.0])
    delta = _deltas_and_grad_inputs(model, clean, corrupt)

    def score(src, dst):
        return float(graph.scores[graph.upstream.index(src), graph.downstream.index(dst)])

    return model, clean, answer, wrong, delta, score


def _add_before(module, delta):
    return [module.register_forward_pre_hook(lambda mod, args: (args[0] + delta, *args[1:]))]


def test_eap_scores_equal_brute_force_gpt2():
    model, clean, answer, wrong, delta, score = _setup("gpt2")
    blocks = model.hf_model.transformer.h
    d = model.d_model

    # logits read the final residual
    g = _grad_through(model, clean, answer, wrong, lambda dl: _add_before(model.final_norm, dl))
    for src in ("input", "a1.h2", "m0", "m2"):
        assert score(src, "logits") == pytest.approx(float((delta[src] * g).sum()), rel=1e-9, abs=1e-12)

    # an MLP reads its private copy through ln_2 (sequential: includes its own layer's heads)
    g = _grad_through(model, clean, answer, wrong, lambda dl: _add_before(blocks[1].ln_2, dl))
    for src in ("input", "a1.h3", "a0.h0", "m0"):
        assert score(src, "m1") == pytest.approx(float((delta[src] * g).sum()), rel=1e-9, abs=1e-12)

    # head h of layer 2: only its query/key/value columns see the perturbed residual
    def one_head(dl, layer=2, head=1):
        block, saved = blocks[layer], {}
        cols = [part * d + head * model.d_head + i for part in range(3) for i in range(model.d_head)]

        def keep_input(mod, args):
            saved["x"] = args[0]

        def splice(mod, args, output):
            moved = block.ln_1(saved["x"] + dl) @ mod.weight + mod.bias  # Conv1D, without re-entering the hook
            output = output.clone()
            output[..., cols] = moved[..., cols]
            return output

        return [block.ln_1.register_forward_pre_hook(keep_input), block.attn.c_attn.register_forward_hook(splice)]

    g = _grad_through(model, clean, answer, wrong, one_head)
    for src in ("input", "a0.h2", "a1.h0", "m0", "m1"):
        assert score(src, "a2.h1") == pytest.approx(float((delta[src] * g).sum()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_eap_scores_equal_brute_force_gqa_and_parallel(family):
    model, clean, answer, wrong, delta, score = _setup(family)  # their norms compute in float32: looser tolerance
    layers = model.layers
    mlp_norm = "post_attention_layernorm"
    attn_norm = "input_layernorm"
    # MLP of layer 1: its own norm's input (parallel NeoX: no edge from its own layer's heads)
    g = _grad_through(model, clean, answer, wrong, lambda dl: _add_before(getattr(layers[1], mlp_norm), dl))
    for src in ("input", "a0.h1", "m0"):
        assert score(src, "m1") == pytest.approx(float((delta[src] * g).sum()), rel=1e-5, abs=1e-9)
    same_layer = score("a1.h0", "m1")
    assert (same_layer == 0.0) == model.parallel
    # attention of layer 2: the per-head scores (grouped-query for LLaMA) add up to the layer's
    for src in ("input", "a0.h3", "m1"):
        g = _grad_through(model, clean, answer, wrong, lambda dl: _add_before(getattr(layers[2], attn_norm), dl))
        total = sum(score(src, f"a2.h{h}") for h in range(model.n_heads))
        assert total == pytest.approx(float((delta[src] * g).sum()), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("family", ["gemma2", "falcon"])
def test_head_outputs_add_up_to_the_attention_output(family):
    # Gemma 2 normalises the attention output before the residual add: heads share it in proportion
    model, clean, answer, wrong, delta, score = _setup(family)
    corrupt = model.encode(PROMPT.replace("Eiffel Tower", "Big Ben")).input_ids
    outs = []
    for ids in (clean, corrupt):
        with torch.no_grad(), Hooks(model) as h:
            cap = h.read(site(1, "attn.out"))
            model.forward(input_ids=ids)
        outs.append(cap.value[0])
    g = _grad_through(model, clean, answer, wrong, lambda dl: _add_before(model.final_norm, dl))
    heads = sum(score(f"a1.h{h}", "logits") for h in range(model.n_heads))
    assert heads == pytest.approx(float(((outs[1] - outs[0]) * g).sum()), rel=1e-5, abs=1e-9)


def test_eap_ig_batch_equals_steps_one_by_one():
    model = tiny_model("qwen2")
    clean = model.encode(PROMPT).input_ids
    corrupt = model.encode(PROMPT.replace("Eiffel Tower", "Big Ben")).input_ids
    args = (model, clean, corrupt, 5, 7)
    both = edge_attribution(*args, alphas=[1 / 3, 2 / 3, 1.0]).scores * 3
    first = edge_attribution(*args, alphas=[1 / 3, 1.0]).scores * 2
    second = edge_attribution(*args, alphas=[2 / 3, 1.0]).scores * 2
    last = edge_attribution(*args, alphas=[1.0]).scores
    torch.testing.assert_close(both, first + second - last, rtol=1e-4, atol=1e-5)


def test_graph_structure_and_pruning():
    up, down, lu, ld, valid = node_names(2, 2, parallel=False)
    assert up == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
    assert down == ["a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", "logits"]
    assert valid[up.index("a0.h0"), down.index("m0")] and not valid[up.index("m0"), down.index("a0.h0")]
    assert not node_names(2, 2, parallel=True)[4][up.index("a0.h0"), down.index("m0")]
    edges = [("input", "m0", -1.0), ("m0", "logits", -1.0), ("a1.h0", "logits", 0.5), ("input", "a0.h1", 0.2)]
    assert prune(edges) == edges[:2]


@pytest.mark.parametrize("family", CAUSAL)
def test_runs_on_causal_families(family):
    result = run(tiny_model(family), ig_steps=2)
    f = result.findings
    assert f["top_edges"] and f["edges"]  # sized by faithfulness: never empty
    assert {"input", "logits"} <= {n for e in f["edges"] for n in (e["src"], e["dst"])}
    assert f["faithfulness"]["recovered"] >= f["faithfulness"]["target"] or f["warnings"]
    names = {n["name"] for n in f["nodes"]}
    assert all(e["src"] in names and e["dst"] in names for e in f["edges"])
    assert result.figures[0]["name"] == "Circuit graph"


def test_noise_fallback_and_ineligible_kinds():
    model = tiny_model("gpt2")
    f = run(model, corrupt_subject="Statue of Liberty of New York").findings
    assert f["corruption"]["kind"] == "noise" and "Statue of Liberty" in f["corruption"]["note"]
    assert f["metric_clean"] != f["metric_corrupted"]
    for family in ("bert", "t5"):
        match = {m.name: m for m in km.match(FACT, tiny_model(family))}["knowledge_circuits"]
        assert not match.eligible
    with pytest.raises(ValueError):
        get_method("knowledge_circuits").Params.from_dict({"method": "acdc"})


@pytest.mark.smollm2
def test_smollm2_circuit(smollm2):
    result = run(smollm2, top_n=8, ig_steps=2, faithfulness=False)
    f = result.findings
    assert f["edges"] and f["nodes"]
    assert f["metric_clean"] > f["metric_corrupted"]
    assert any(e["src"] == "input" for e in f["edges"]) and any(e["dst"] == "logits" for e in f["edges"])
    fig = result.figures[0]["plotly"]
    assert len(fig["data"]) == len(f["edges"]) + 1


@pytest.mark.parametrize("family", CAUSAL)
def test_split_head_gradients_equal_one_vjp_per_head(family, monkeypatch):
    """Each head's incoming gradient, taken through the attention core, its own q/k/v columns and the
    norm (`split_head_vjp`), equals the VJP of the whole path per head (`head_vjp`), in every causal
    family (grouped-query, multi-query, fused and separate projections, parallel blocks)."""
    model = build_tiny(family)
    model.hf_model.double()
    clean = model.encode(PROMPT).input_ids
    corrupt = model.encode(PROMPT.replace("Eiffel Tower", "Big Ben")).input_ids
    args = (model, clean, corrupt, 5, 7)
    used = []
    split = circuits_engine.split_head_vjp
    monkeypatch.setattr(circuits_engine, "split_head_vjp", lambda *a: used.append(split(*a)) or used[-1])
    fast = edge_attribution(*args, alphas=[0.5, 1.0])
    assert len(used) == model.n_layers and all(g is not None for g in used)
    monkeypatch.setattr(circuits_engine, "split_head_vjp", lambda *a: split(*a, budget=1))  # one head per chunk
    chunked = edge_attribution(*args, alphas=[0.5, 1.0])
    monkeypatch.setattr(circuits_engine, "split_head_vjp", lambda *a: None)  # the per-head VJP of the whole path
    slow = edge_attribution(*args, alphas=[0.5, 1.0])
    torch.testing.assert_close(fast.scores, slow.scores, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(chunked.scores, slow.scores, rtol=1e-9, atol=1e-12)
    assert fast.metric == slow.metric


# --- circuits sized by faithfulness -------------------------------------------------------


def test_planted_faithfulness_curve_and_chosen_size(planted):
    """The planted route carries the whole fact: circuits without it recover ~nothing, the first
    circuit holding it recovers ~all, and that is the size chosen (the smallest reaching 80%)."""
    (nl, _), (hl, hh) = planted.neuron, planted.head
    route = {("input", f"m{nl}"), (f"m{nl}", f"a{hl}.h{hh}"), (f"a{hl}.h{hh}", "logits")}
    f = run(planted.model, without_target_new(planted.sample), ig_steps=10).findings
    faith = f["faithfulness"]
    assert faith["sized_by"] == "faithfulness" and faith["target"] == 0.8
    curve = faith["curve"]
    assert [p["edges"] for p in curve] == sorted(p["edges"] for p in curve)
    chosen = faith["chosen_size"]
    assert chosen == min(p["edges"] for p in curve if p["recovered"] >= 0.8)
    assert all(p["recovered"] < 0.8 for p in curve if p["edges"] < chosen)
    assert faith["recovered"] == pytest.approx(1.0, abs=0.05)
    assert all(p["recovered"] == pytest.approx(1.0, abs=0.05) for p in curve if p["edges"] >= chosen)  # monotone here
    assert curve[-1]["edges"] == f["n_edges_scored"] and curve[-1]["recovered"] == pytest.approx(1.0, abs=1e-4)
    assert route <= {(e["src"], e["dst"]) for e in f["edges"]}
    assert chosen <= 10 and f["holds"] is True and not f["warnings"]
    assert "faithful" in run(planted.model, without_target_new(planted.sample), ig_steps=2).summary


class _Curve(circuits_search.Evaluator):
    """An evaluator whose faithfulness at each size is a given function (no model)."""

    def __init__(self, n, fn):
        self.order, self.fn, self.points, self.masks, self.passes = torch.arange(n), fn, {}, {}, 0
        self.rows = []

    def measure(self, sizes):
        new = sorted(set(sizes) - set(self.points))
        self.rows.append(len(new))
        self.passes += 1
        for s in new:
            r = self.fn(s)
            self.points[s] = circuits_search.Point(s, s, 1, r, r)
            self.masks[s] = torch.ones(1, 1, dtype=torch.bool)


@pytest.mark.parametrize("fn", [lambda s: min(1.0, s / 1000), lambda s: float(s >= 37), lambda s: 0.9])
def test_search_chooses_the_smallest_size_meeting_the_target(fn):
    ev = _Curve(44371, fn)
    found = circuits_search.search(ev, 0.8)
    sizes = sorted(ev.points)
    first = next(s for s in range(1, 44372) if fn(s) >= 0.8)  # the true smallest size
    assert first <= found.chosen.size <= max(first + 1, 1.1 * first)
    assert all(ev.points[s].recovered < 0.8 for s in sizes if s < found.chosen.size)
    assert found.passes <= 4 and max(ev.rows) <= 16  # several sizes per batched pass
    fixed = circuits_search.search(_Curve(44371, fn), 0.8, size=50)
    assert fixed.chosen.size == 50 and fixed.passes == 1


def test_unreachable_target_keeps_the_most_faithful():
    found = circuits_search.search(_Curve(1000, lambda s: 0.3 + 0.2 * (s == 100)), 0.8)
    assert found.chosen.recovered == pytest.approx(0.5) or found.chosen.recovered == pytest.approx(0.3)
    assert found.chosen.recovered == max(p.recovered for p in found.points)


def test_circuit_mask_equals_pruning():
    up, down, lu, ld, valid = node_names(2, 2, parallel=False)
    scores = torch.zeros(len(up), len(down))
    for src, dst, sc in [("input", "m0", -3.0), ("m0", "logits", -2.0), ("a1.h0", "logits", 1.5), ("input", "a0.h1", 0.2),
                         ("a0.h1", "m1", 0.1)]:
        scores[up.index(src), down.index(dst)] = sc
    graph = circuits_engine.Graph(up, down, lu, ld, scores, valid, [0.0, 1.0], {})
    order = circuits_search.ranked_edges(graph)
    for n in range(1, 6):
        top = [(up[int(i) // len(down)], down[int(i) % len(down)], float(scores.flatten()[i])) for i in order[:n]]
        got = circuits_search.edge_list(graph, circuits_search.circuit_mask(graph, order[:n]))
        assert sorted(got) == sorted(prune(top))
    assert not circuits_search.circuit_mask(graph, order[:1]).any()  # one edge: no path


def test_empty_circuit_is_an_error(planted):
    sample = without_target_new(planted.sample)
    with pytest.raises(ValueError, match="empty circuit.*path from the input to the logits.*top_n"):
        run(planted.model, sample, top_n=1)
    from knowmri.diagnosis import run_method

    result = run_method(get_method("knowledge_circuits"), planted.model, sample, {"top_n": 1}, RunContext())
    assert result.status == "error" and "empty circuit" in result.error
    with pytest.raises(ValueError, match="top_n"):
        get_method("knowledge_circuits").Params.from_dict({"faithfulness": False})


def test_counterfactual_contrast_and_noise_option(planted):
    # CounterFact's target_new is the contrast answer; the subject is chosen to make the model answer it
    f = run(planted.model, planted.sample, ig_steps=2).findings
    assert f["contrast_answer"] == " Rome" and f["corruption"]["kind"] == "counterfactual"
    assert "target_new" in f["corruption"]["source"]
    noised = run(planted.model, without_target_new(planted.sample), corruption="noise", ig_steps=2).findings
    assert noised["corruption"]["kind"] == "noise" and noised["contrast_subject"] is None
    assert not circuits_corruption.is_function_word(noised["contrast_answer"])
    assert circuits_corruption.is_function_word(" the") and circuits_corruption.is_function_word(",")
    assert not circuits_corruption.is_function_word(" Paris")


@pytest.mark.smollm2
@pytest.mark.skipif(not KNOWN_1000.exists(), reason="needs /work/shared/data/known_1000")
def test_smollm2_known_1000_circuit_is_faithful(smollm2):
    """A real known_1000 fact (SmolLM2 answers it): a same-kind counterfactual contrast, and a circuit
    that recovers the target share of the logit difference."""
    sample = km.load_dataset("known_1000", path=KNOWN_1000)[6]  # Catalonia belongs to the continent of -> Europe
    result = run(smollm2, sample, ig_steps=2)
    f = result.findings
    assert f["edges"] and f["holds"] is True
    assert f["faithfulness"]["recovered"] >= 0.8 and f["faithfulness"]["chosen_size"] < f["n_edges_scored"]
    assert not circuits_corruption.is_function_word(f["corruption"]["model_answer"])
    assert f["contrast_answer"] != f["answer"] and f["metric_clean"] > 0 > f["metric_corrupted"]
    assert [fig["name"] for fig in result.figures] == ["Circuit graph", "Faithfulness by circuit size"]
