"""Causal tracing: the planted neuron and copy head are found, the batched engine equals ROME's
per-(token, layer) loop, every family runs, bad input is refused, and SmolLM2's Eiffel Tower
fact shows the classic early and late sites."""

import pytest
import torch

import knowmri as km
from knowmri.methods.base import RunContext, get_method
from knowmri.testing import FAMILIES, tiny_model
from knowmri.testing.rome_reference import rome_inputs, rome_trace

FACT = km.Sample(prompt="The Eiffel Tower is located in the city of", ground_truth=" Paris",
                 triple_subject="Eiffel Tower")
SHORT = km.Sample(prompt="The Eiffel Tower is in", ground_truth=" Paris", triple_subject="Eiffel Tower")


def run(model, sample, **params):
    method = get_method("causal_tracing")
    return method.run(model, sample, method.Params.from_dict(params), RunContext())


def test_planted_mechanism(planted):
    f = run(planted.model, planted.sample, samples=3, window=1).findings
    high, low = f["high_score"], f["low_score"]
    assert high > 0.9 and low < 0.5 * high
    layer, _ = planted.neuron
    assert (f["peaks"]["mlp"]["token"], f["peaks"]["mlp"]["layer"]) == (planted.neuron_position, layer)
    mlp = torch.tensor(f["mlp"])
    assert mlp[planted.neuron_position, layer] - low > 0.9 * (high - low)
    head_layer, _ = planted.head
    last = torch.tensor(f["attn"])[planted.last_position]
    assert last[head_layer] - low > 0.9 * (high - low)
    assert (last[:head_layer] - low).abs().max() < 0.1 * (high - low)
    hidden = torch.tensor(f["hidden"])
    assert hidden[planted.neuron_position, :layer + 1].min() - low > 0.9 * (high - low)  # early site
    assert hidden[planted.last_position, head_layer:].min() - low > 0.9 * (high - low)  # late site
    assert f["subject_span"] == {"start": planted.subject_span.start, "stop": planted.subject_span.stop}
    assert f["layer_scores_kind"] == "mlp" and max(f["layer_scores"], key=lambda s: s["score"])["layer"] == layer
    assert max(f["token_scores"], key=lambda s: s["score"])["index"] in (planted.neuron_position, planted.last_position)


@pytest.fixture
def suffix_engine(monkeypatch):
    """The suffix engine even where its extra block calls cost more than they save (tiny models)."""
    monkeypatch.setattr("knowmri.methods.tracing_engine.suffix_pays", lambda *args: True)


def test_engine_choice_by_cost():
    """Tiny models re-run whole sequences (fixed costs dominate); real-sized ones only suffixes."""
    from knowmri.methods.tracing_engine import suffix_pays

    tiny = tiny_model("llama")
    assert not suffix_pays(tiny, 10, 1, 10, ["hidden", "mlp", "attn"], 10)
    assert run(tiny, SHORT, samples=2, window=2).findings["engine"] == "block replay"


@pytest.mark.parametrize("model_name", ["planted-gpt2", "planted-llama", "bloom", "falcon", "opt", "bert"])
def test_equals_rome_loop(model_name, suffix_engine):
    """The batched, prefix-reusing grids equal ROME's one-forward-per-cell loop with the same noise."""
    if model_name.startswith("planted"):
        model, sample = km.testing.planted_model(model_name.split("-")[1]).model, FACT
    else:
        model, sample = tiny_model(model_name), SHORT
    kinds = ["hidden", "mlp", "attn"]
    result = run(model, sample, samples=2, window=2, kinds=kinds, batch_size=5)
    inputs = rome_inputs(model, sample, samples=2, noise=3.0, seed=1)
    low, grids = rome_trace(model, **inputs, kinds=kinds, window=2)
    assert result.findings["engine"] == ("suffix block replay" if model.kind == "causal" else "block replay")
    assert result.findings["low_score"] == pytest.approx(low, abs=1e-6)
    for kind in kinds:
        torch.testing.assert_close(torch.tensor(result.findings[kind]), grids[kind], atol=1e-6, rtol=1e-4)


def test_fallback_full_forwards_equal_rome_loop(monkeypatch):
    """When block replay is not reproducible, the engine falls back to full forwards: same grids."""
    from knowmri.methods.block_replay import BlockRunner

    monkeypatch.setattr(BlockRunner, "check", lambda self, *args: setattr(self, "direct", False))
    model = km.testing.planted_model("gpt2").model
    result = run(model, FACT, samples=2, window=2)
    low, grids = rome_trace(model, **rome_inputs(model, FACT, samples=2, noise=3.0, seed=1),
                            kinds=["hidden", "mlp", "attn"], window=2)
    assert result.findings["engine"] == "full forwards"
    for kind in grids:
        torch.testing.assert_close(torch.tensor(result.findings[kind]), grids[kind], atol=1e-6, rtol=1e-4)


def test_suffix_check_failure_falls_back_to_whole_sequences(monkeypatch, suffix_engine):
    """When replaying only the positions after the restored token does not reproduce the model, the
    engine re-runs whole sequences from the restored block: the same grids."""
    from knowmri.methods.tracing_engine import SuffixRunner

    model = km.testing.planted_model("llama").model
    fast = run(model, FACT, samples=2, window=2).findings
    monkeypatch.setattr(SuffixRunner, "check", lambda self, *args: False)
    slow = run(model, FACT, samples=2, window=2).findings
    assert (fast["engine"], slow["engine"]) == ("suffix block replay", "block replay")
    for kind in ("hidden", "mlp", "attn"):
        torch.testing.assert_close(torch.tensor(fast[kind]), torch.tensor(slow[kind]), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family, suffix_engine, monkeypatch):
    from knowmri.methods import tracing_engine

    built = []

    class Spy(tracing_engine.SuffixRunner):
        def __init__(self, *args, skip=True, **kwargs):
            built.append(skip)
            super().__init__(*args, skip=skip, **kwargs)

    monkeypatch.setattr(tracing_engine, "SuffixRunner", Spy)
    model = tiny_model(family)
    method = get_method("causal_tracing")
    if model.kind == "seq2seq":
        assert method.check(model, FACT)
        return
    assert method.check(model, FACT) == []
    f = run(model, SHORT, samples=2, window=2).findings
    n_tok = len(f["tokens"])
    for kind in ("hidden", "mlp", "attn"):
        assert len(f[kind]) == n_tok and all(len(row) == model.n_layers for row in f[kind])
    assert 0 <= f["low_score"] <= 1 and 0 <= f["high_score"] <= 1
    assert f["engine"] == ("suffix block replay" if model.kind == "causal" else "block replay")
    assert all(built) and bool(built) == (model.kind == "causal")  # block arguments recorded without computing
    assert [s["index"] for s in f["token_scores"]] == list(range(n_tok))
    assert len(f["layer_scores"]) == model.n_layers


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "t5"])
def test_last_block_mlp_at_one_position(family):
    """The last block's MLP may run on the read-out position only: that position's output is unchanged."""
    from knowmri.hooks import Hooks
    from knowmri.methods.block_replay import mlp_at_one_position

    model = tiny_model(family)
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    L = model.n_layers
    rows = []
    handle = model.component(L - 1, "mlp_down").register_forward_pre_hook(lambda m, a: rows.append(a[0].shape))
    try:
        with Hooks(model) as h:
            full = h.read(f"blocks.{L - 1}.resid_post")
            model.forward(input_ids=ids, attention_mask=torch.ones_like(ids))
        with Hooks(model) as h, mlp_at_one_position(model, L - 1, -1):
            one = h.read(f"blocks.{L - 1}.resid_post")
            model.forward(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        handle.remove()
    torch.testing.assert_close(one.value[:, -1], full.value[:, -1], atol=1e-5, rtol=1e-5)
    if not model.spec.flat_mlp:
        assert rows[1][-2] == 1 and rows[0][-2] == ids.shape[1]


def test_kinds_subset_and_same_noise_for_same_seed():
    model = tiny_model("llama")
    a = run(model, SHORT, samples=2, kinds="hidden").findings
    b = run(model, SHORT, samples=2, kinds=["hidden"]).findings
    c = run(model, SHORT, samples=2, kinds=["hidden"], seed=7).findings
    assert "mlp" not in a and "attn" not in a
    assert a["hidden"] == b["hidden"] and a["hidden"] != c["hidden"]


def test_bad_input():
    model = tiny_model("gpt2")
    method = get_method("causal_tracing")
    for bad in ({"kinds": ["mlp", "neurons"]}, {"kinds": []}, {"window": -1}, {"samples": 0}, {"noise": -1.0}):
        with pytest.raises(ValueError):
            method.Params.from_dict(bad)
    with pytest.raises(ValueError, match="subject"):
        run(model, km.Sample(prompt="The Eiffel Tower is in", ground_truth=" Paris"))
    with pytest.raises(ValueError, match="does not occur"):
        run(model, km.Sample(prompt="The Eiffel Tower is in", triple_subject="Big Ben"))
    sample = object.__new__(km.Sample)  # bypass the Sample's own check: the method must refuse too
    sample._data = {"prompt": "The Eiffel Tower is in", "ground_truth": " Paris", "triple_subject": "Big Ben"}
    with pytest.raises(ValueError, match="does not occur"):
        run(model, sample)


@pytest.mark.smollm2
def test_smollm2_eiffel_early_and_late_sites(smollm2):
    result = run(smollm2, FACT, samples=1, kinds=["hidden"])
    f = result.findings
    high, low = f["high_score"], f["low_score"]
    assert high > 0.5 and low < 0.2 * high
    hidden = torch.tensor(f["hidden"]) - low
    drop, L = high - low, smollm2.n_layers
    span = range(f["subject_span"]["start"], f["subject_span"]["stop"])
    last = f["position"]
    early = max(float(hidden[t, : L // 3].max()) for t in span)
    assert early > 0.5 * drop  # early site: a subject token in the early layers
    assert float(hidden[last, : L // 3].max()) < 0.2 * drop  # the last token does not matter early ...
    assert float(hidden[last, L - L // 5:].min()) > 0.5 * drop  # ... but does in the late layers
    assert "Early site" in result.summary and "late site" in result.summary


@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_engine_equals_whole_sequences(family, monkeypatch):
    """On every causal family, the suffix staircase (shared window groups, the MLP window's first block
    skipped where the MLP output adds to the residual stream as is) gives the whole-sequence engine's grids."""
    from knowmri.methods import tracing_engine

    model = tiny_model(family)
    if model.kind != "causal":
        pytest.skip("the suffix engine is for causal models")
    shortcut = []
    real = tracing_engine._first_block_shortcut
    monkeypatch.setattr(tracing_engine, "_first_block_shortcut", lambda *a: shortcut.append(real(*a)) or shortcut[-1])
    kinds = ["hidden", "mlp", "attn"]
    monkeypatch.setattr(tracing_engine, "suffix_pays", lambda *args: True)
    fast = run(model, SHORT, samples=2, window=3, kinds=kinds).findings
    monkeypatch.setattr(tracing_engine, "suffix_pays", lambda *args: False)
    slow = run(model, SHORT, samples=2, window=3, kinds=kinds).findings
    assert (fast["engine"], slow["engine"]) == ("suffix block replay", "block replay")
    assert shortcut == [True]  # every family adds the MLP output to the residual stream as is
    for kind in kinds:
        torch.testing.assert_close(torch.tensor(fast[kind]), torch.tensor(slow[kind]), atol=1e-6, rtol=1e-4)


def test_without_first_block_shortcut(monkeypatch, suffix_engine):
    """Where the shortcut's check fails, the MLP window's first block is run: the same grids."""
    from knowmri.methods import tracing_engine

    model = km.testing.planted_model("llama").model
    fast = run(model, FACT, samples=2, window=3).findings
    monkeypatch.setattr(tracing_engine, "_first_block_shortcut", lambda *args: False)
    slow = run(model, FACT, samples=2, window=3).findings
    for kind in ("hidden", "mlp", "attn"):
        torch.testing.assert_close(torch.tensor(fast[kind]), torch.tensor(slow[kind]), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("window", [1, 2, 3, 10])
def test_staircase_cost_counts_the_engine(window, monkeypatch, suffix_engine):
    """`estimate`'s staircase count (`staircase_cost`) is the number of S-row groups the engine runs."""
    from knowmri.methods import tracing_engine

    model = km.testing.planted_model("llama").model
    runs, reads = [], []
    block, flush = tracing_engine.SuffixRunner.block, tracing_engine._Readouts.flush

    def spy_block(self, layer, hidden):
        runs.append(hidden.shape[0] // 2)
        return block(self, layer, hidden)

    def spy_flush(self):
        reads.append(self.rows // 2)
        return flush(self)

    result = run(model, FACT, samples=2, window=window)
    L, T = model.n_layers, len(result.findings["tokens"])
    cells = range(result.findings["subject_span"]["start"], T)
    want_calls = want_groups = 0
    for kind in ("hidden", "mlp", "attn"):
        starts = [layer + 1 if kind == "hidden" else tracing_engine.window_layers(layer, window, L).start for layer in range(L)]
        for _ in cells:
            calls, groups = tracing_engine.staircase_cost(kind, list(range(L)), starts, window, L, kind == "mlp")
            want_calls, want_groups = want_calls + calls, want_groups + groups
    monkeypatch.setattr(tracing_engine.SuffixRunner, "block", spy_block)
    monkeypatch.setattr(tracing_engine._Readouts, "flush", spy_flush)
    monkeypatch.setattr(tracing_engine.SuffixRunner, "check", lambda self, *args: True)
    monkeypatch.setattr(tracing_engine, "_first_block_shortcut", lambda *args: True)
    run(model, FACT, samples=2, window=window, batch_size=10_000)
    assert sum(runs) == want_calls  # the checks run one row (0 groups of 2)
    assert sum(reads) == want_groups  # the staircases' final rows, read out together


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_layer_model(family, monkeypatch):
    """A one-block model: the MLP shortcut's check and the staircase read out after the only block."""
    from knowmri.methods import tracing_engine
    from knowmri.testing import tiny

    monkeypatch.setattr(tiny, "N_LAYERS", 1)
    model = tiny.build_tiny(family)
    assert model.n_layers == 1
    monkeypatch.setattr(tracing_engine, "suffix_pays", lambda *args: True)
    fast = run(model, SHORT, samples=2, window=1).findings
    monkeypatch.setattr(tracing_engine, "suffix_pays", lambda *args: False)
    slow = run(model, SHORT, samples=2, window=1).findings
    assert (fast["engine"], slow["engine"]) == ("suffix block replay", "block replay")
    for kind in ("hidden", "mlp", "attn"):
        torch.testing.assert_close(torch.tensor(fast[kind]), torch.tensor(slow[kind]), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("model_name", ["planted-llama", "bert"])
def test_stderr_equals_the_spread_of_rome_loops_per_noise_sample(model_name, suffix_engine):
    """Each cell's standard error is std / sqrt(n) of the per-sample grids of ROME's loop (one noise
    sample at a time), on both engines; the peaks' intervals are t-intervals of the paired effects."""
    from scipy import stats

    if model_name.startswith("planted"):
        model, sample = km.testing.planted_model(model_name.split("-")[1]).model, FACT
    else:
        model, sample = tiny_model(model_name), SHORT
    kinds, S = ["hidden", "mlp", "attn"], 3
    f = run(model, sample, samples=S, window=2, kinds=kinds).findings
    inputs = rome_inputs(model, sample, samples=S, noise=3.0, seed=1)
    noise = inputs.pop("noise")
    per = [rome_trace(model, **inputs, noise=noise[s:s + 1], kinds=kinds, window=2) for s in range(S)]
    lows = torch.tensor([p[0] for p in per], dtype=torch.float64)
    assert f["low_stderr"] == pytest.approx(float(lows.std() / S ** 0.5), abs=1e-6)
    for kind in kinds:
        stack = torch.stack([p[1][kind] for p in per]).double()  # [S, T, L]
        torch.testing.assert_close(torch.tensor(f[f"{kind}_stderr"]).double(), stack.std(0) / S ** 0.5,
                                   atol=1e-6, rtol=1e-4)
        pk = f["peaks"][kind]
        diff = stack[:, pk["token"], pk["layer"]] - lows
        lo, hi = stats.t.interval(0.95, S - 1, loc=float(diff.mean()), scale=float(diff.std() / S ** 0.5))
        assert pk["ci"] == pytest.approx([lo, hi], abs=1e-5)
        assert pk["layer_range"][0] <= pk["layer"] <= pk["layer_range"][1]


def test_evidence_roles_window_and_warnings(planted):
    f = run(planted.model, planted.sample, samples=4).findings
    L = planted.model.n_layers
    assert f["window"] == max(1, round(L * 10 / 48)) and f["window_auto"]
    assert all(s["window"] == f["window"] for s in f["sites"] if s["kind"] != "hidden")
    span = planted.subject_span
    assert f["roles"][span.stop - 1] == "subject_last" and f["roles"][-1] == "last"
    assert f["roles"][span.stop] == "subsequent_first" and f["roles"][:span.start] == ["before_subject"] * span.start
    assert f["role_effects"]["mlp"]["subject_last"]["token"] == planted.neuron_position
    for kind in ("hidden", "mlp", "attn"):
        assert len(f[f"{kind}_stderr"]) == len(f[kind]) and len(f[f"{kind}_stderr"][0]) == L
    assert f["holds"] is True and not any("small drop" in w for w in f["warnings"])
    one = run(planted.model, planted.sample, samples=1, window=3)
    assert one.findings["window"] == 3 and not one.findings["window_auto"]
    assert any("one noise sample" in w for w in one.findings["warnings"]) and "Warning:" in one.summary
    assert torch.tensor(one.findings["mlp_stderr"]).abs().max() == 0
    fig = one.figures[0]["figure"] if "figure" in one.figures[0] else one.figures[0]
    assert "customdata" in str(fig) and "s.e." in str(fig)


def test_auto_window_scales_to_depth():
    from knowmri.methods.tracing_engine import auto_window, window_layers

    assert auto_window(48) == 10 and auto_window(30) == 6 and auto_window(3) == 1 and auto_window(12) == 2
    assert window_layers(5, 0, 30) == window_layers(5, 6, 30)
