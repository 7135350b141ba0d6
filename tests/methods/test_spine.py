"""SPINE: the paper's losses train, activations are capped to [0, 1] and sparse, planted binary features
are recovered as dimensions, and the trained weights are cached and reused."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import knowmri as km
from knowmri.methods.base import RunContext, get_method
from knowmri.methods.spine import encode, token_texts, train_spine, word_rows
from knowmri.testing import FAMILIES, build_tiny, tiny_model

PROMPT = {"prompt": "The Eiffel Tower is located in the city of Paris"}
QUICK = {"epochs": 3, "hidden_dim": 32, "vocab_limit": 200}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KNOWMRI_HOME", str(tmp_path))
    return tmp_path


def run(model, sample=PROMPT, **params):
    method = get_method("spine")
    return method.run(model, km.Sample(sample), method.Params.from_dict(params), RunContext())


def planted_features(n, d=64, k=8, seed=1):
    """Rows that are sparse binary combinations of k random feature vectors, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    features = (torch.rand(n, k, generator=g) < 0.2).float()
    rows = features @ torch.randn(k, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)
    return features, rows


def best_correlation(features, z):
    fc, zc = features - features.mean(0), z - z.mean(0)
    corr = (fc.T @ zc) / (fc.norm(dim=0)[:, None] * zc.norm(dim=0)[None] + 1e-9)
    return corr.max(1).values


def test_losses_decrease_and_codes_are_sparse_and_capped():
    _, rows = planted_features(300)
    x = (rows - rows.mean(0)) / rows.std()
    weights, stats = train_spine(x, 64, epochs=40, seed=0)
    losses = stats["losses"]
    assert losses["total"][-1] < 0.5 * losses["total"][0]
    assert losses["reconstruction"][-1] < 0.2 * losses["reconstruction"][0]
    assert losses["psl"][-1] < losses["psl"][0]  # activations are pushed to 0 or 1
    z = encode(weights, x)
    assert float(z.min()) == 0.0 and float(z.max()) <= 1.0
    assert stats["sparsity"] >= 0.7  # the target is 0.85: the ASL holds the mean activation near rho
    assert stats["mean_activation"] <= 0.3
    assert stats["binary_fraction"] >= 0.8


def test_planted_binary_features_become_dimensions():
    model = build_tiny("llama")
    rows = word_rows(model, 0)
    features, planted = planted_features(len(rows))
    with torch.no_grad():
        model.embed_module.weight[torch.tensor(rows)] = planted
    result = run(model, hidden_dim=64, vocab_limit=0, epochs=20)
    assert result.findings["vocab_rows"] == len(rows)
    weights = load_file(result.findings["cache_file"])
    x = (planted - planted.mean(0)) / planted.std()
    assert best_correlation(features, encode(weights, x)).min() > 0.9
    # A token that has exactly one feature activates that feature's dimension most.
    f0 = best_correlation(features[:, :1], encode(weights, x)).item()
    assert f0 > 0.9


def test_cache_is_written_and_reused(home):
    model = tiny_model("gpt2")
    first = run(model, **QUICK)
    path = first.findings["cache_file"]
    assert not first.findings["cached"]
    assert path.startswith(str(home / "spine")) and path.endswith(".safetensors")
    second = run(model, **QUICK)
    assert second.findings["cached"]
    assert second.findings["dimensions"] == first.findings["dimensions"]
    assert second.findings["training"] == first.findings["training"]
    assert "cache" in second.summary
    other = run(model, **{**QUICK, "seed": 1})
    assert not other.findings["cached"] and other.findings["cache_file"] != path
    assert len(list((home / "spine").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_every_family(family):
    model = tiny_model(family)
    result = run(model, **QUICK)
    f = result.findings
    assert f["hidden_dim"] == 32 and f["vocab_rows"] == 200
    assert f["dimensions"] and all(len(d["words"]) == 8 for d in f["dimensions"])
    assert set(f["token_dimensions"]) <= {t["token"] for t in f["token_activity"]}
    assert all(0 <= dim < 32 for dims in f["token_dimensions"].values() for dim in dims)
    assert len(f["training"]["losses"]["total"]) == 3
    json.dumps(result.to_dict(), allow_nan=False)


def test_default_sizes_follow_the_model():
    model = tiny_model("gpt2")
    f = run(model, epochs=1).findings
    assert f["hidden_dim"] == 4 * model.d_model  # min(4 x d_model, 1000)
    assert f["vocab_rows"] == len(word_rows(model, 0))  # a tiny vocabulary is used whole


def test_word_rows_prefer_word_start_tokens():
    model = tiny_model("gpt2")
    texts = [model.tokenizer.decode([i]) for i in word_rows(model, 50)]
    assert all(t.startswith(" ") and t.strip().isalpha() for t in texts)


def test_bad_parameters():
    with pytest.raises(ValueError, match="rho"):
        get_method("spine").Params.from_dict({"rho": 1.5})


def test_trains_under_inference_mode():
    with torch.inference_mode():
        x = torch.randn(64, 16)
        weights, stats = train_spine(x, 32, epochs=2)
    assert len(stats["losses"]["total"]) == 2 and weights["w_enc"].shape == (16, 32)


def reference_train(x, hidden_dim, *, rho=0.15, noise=0.2, epochs=2, batch_size=64, lr=3e-3, seed=0):
    """SPINE as first written: autograd and fused torch.optim.Adam over the parameters held in one flat buffer, as
    train_spine holds them (what the hand-written gradient must equal bit for bit)."""
    n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    shapes = {"w_enc": (d, hidden_dim), "w_dec": (hidden_dim, d), "b_dec": (d,), "b_enc": (hidden_dim,)}
    flat = torch.zeros(sum(math.prod(s) for s in shapes.values()), requires_grad=True)
    spans, at = {}, 0
    for key, shape in shapes.items():
        spans[key] = (at, at + math.prod(shape))
        at += math.prod(shape)

    def views():
        return {key: flat[a:b].view(shapes[key]) for key, (a, b) in spans.items()}

    with torch.no_grad():
        for key, bound in (("w_enc", d**-0.5), ("b_enc", d**-0.5), ("w_dec", hidden_dim**-0.5),
                           ("b_dec", hidden_dim**-0.5)):  # the generator's order
            views()[key].copy_((torch.rand(shapes[key], generator=g) * 2 - 1) * bound)
    opt = torch.optim.Adam([flat], lr=lr, fused=True)
    batches = -(-n // batch_size)
    totals = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        sums = torch.zeros(3)
        for i in range(batches):
            y = x[order[i * batch_size : (i + 1) * batch_size]]
            noisy = y + noise * torch.randn(y.shape, generator=g)
            w_enc, b_enc, w_dec, b_dec = (views()[k] for k in ("w_enc", "b_enc", "w_dec", "b_dec"))
            z = (noisy @ w_enc + b_enc).clamp(0, 1)
            rec = ((z @ w_dec + b_dec - y) ** 2).mean()
            asl = ((z.mean(0) - rho).clamp(min=0) ** 2).sum() / hidden_dim
            psl = (z * (1 - z)).mean()
            opt.zero_grad(set_to_none=True)
            (rec + asl + psl).backward()
            opt.step()
            sums += torch.stack([rec, asl, psl]).detach() * len(y)
        totals.append(sum((sums / n).tolist()))
    return views(), totals


@pytest.mark.parametrize(("n", "d", "batch_size"), [(300, 64, 64), (200, 18, 7)])  # noise drawn per epoch / per batch
def test_update_equals_autograd_and_adam_bit_for_bit(n, d, batch_size):
    _, rows = planted_features(n, d=d)
    x = (rows - rows.mean(0)) / rows.std()
    weights, stats = train_spine(x, 48, epochs=3, batch_size=batch_size, seed=3)
    expected, totals = reference_train(x, 48, epochs=3, batch_size=batch_size, seed=3)
    for key, value in expected.items():
        assert torch.equal(weights[key], value.detach()), key
    assert stats["losses"]["total"] == totals


def test_token_texts_match_batch_decode():
    tok = tiny_model("gpt2").tokenizer
    assert token_texts(tok, 300) == tok.batch_decode([[i] for i in range(300)])

    class Slow:  # no Rust backend: the per-id path
        def batch_decode(self, ids):
            return [f"t{i[0]}" for i in ids]

    assert token_texts(Slow(), 3) == ["t0", "t1", "t2"]
