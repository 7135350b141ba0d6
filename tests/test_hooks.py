"""The hooks engine: indexing, edits, gradients, nesting and error messages."""

from __future__ import annotations

import pytest
import torch

from knowmri.hooks import Capture, Hooks, select, site
from knowmri.testing import tiny_model

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(params=["gpt2", "llama", "opt"], ids=["gpt2", "llama", "opt"])
def model(request: pytest.FixtureRequest):
    return tiny_model(request.param)


def forward(model, batch: int = 1, setup=None, grad: bool = False):
    enc = model.encode(PROMPT)
    with torch.set_grad_enabled(grad), Hooks(model) as h:
        out = setup(h) if setup is not None else None
        logits = model.forward(**enc.inputs(batch))
    return logits, out


# --------------------------------------------------------------------------- select()


def test_select_rows_positions_units() -> None:
    x = torch.arange(2 * 5 * 7).reshape(2, 5, 7)
    assert x[select(x)].shape == (2, 5, 7)
    assert x[select(x, rows=[1])].shape == (1, 5, 7)
    assert x[select(x, positions=[0, 3])].shape == (2, 2, 7)
    assert x[select(x, units=[6])].shape == (2, 5, 1)
    sub = x[select(x, rows=[0, 1], positions=[1, 2, 4], units=[0, 5])]
    assert sub.shape == (2, 3, 2)  # an outer product of the three index lists
    assert sub[1, 2, 1] == x[1, 4, 5]
    assert x[select(x, rows=1, positions=slice(1, 3))].shape == (1, 2, 7)
    assert x[select(x, positions=torch.tensor([4]))].shape == (2, 1, 7)


def test_select_heads_axis() -> None:
    x = torch.zeros(2, 5, 4, 16)  # [B, T, heads, d_head]: units index the heads
    assert x[select(x, units=[1, 3])].shape == (2, 5, 2, 16)
    assert x[select(x, positions=[2], units=[0])].shape == (2, 1, 1, 16)


def test_select_paired() -> None:
    x = torch.arange(3 * 4 * 6).reshape(3, 4, 6)
    pairs = x[select(x, rows=[0, 2], positions=[3, 1], paired=True)]
    assert pairs.shape == (2, 6)
    assert torch.equal(pairs[0], x[0, 3]) and torch.equal(pairs[1], x[2, 1])
    picked = x[select(x, rows=[0, 2], positions=[3, 1], units=[5], paired=True)]
    assert picked.shape == (2, 1) and picked[1, 0] == x[2, 1, 5]
    heads = torch.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)
    assert heads[select(heads, rows=[1], positions=[2], units=[3], paired=True)].shape == (1, 1, 2)
    with pytest.raises(ValueError, match="same length"):
        select(x, rows=[0, 1], positions=[2], paired=True)
    with pytest.raises(ValueError, match="same length"):
        select(x, rows=None, positions=[2], paired=True)


# --------------------------------------------------------------------------- operations


def test_read_shapes_and_subsets(model) -> None:
    enc = model.encode(PROMPT)
    t = enc.input_ids.shape[1]

    def setup(h: Hooks) -> list[Capture]:
        return [h.read("blocks.0.mlp.neurons"), h.read("blocks.0.mlp.neurons", positions=[t - 1]),
                h.read("blocks.1.attn.heads", rows=[1]), h.read("embed")]

    _, (full, last, heads, emb) = forward(model, batch=2, setup=setup)
    assert full.value.shape == (2, t, model.d_mlp)
    assert last.value.shape == (2, 1, model.d_mlp)
    torch.testing.assert_close(last.value[:, 0], full.value[:, t - 1])
    assert heads.value.shape == (1, t, model.n_heads, model.d_head)
    assert emb.value.shape == (2, t, model.d_model)
    assert not full.value.requires_grad
    assert "blocks.0.mlp.neurons" in repr(full)


def test_replace_only_touches_the_selection(model) -> None:
    name = "blocks.1.mlp.neurons"

    def setup(h: Hooks) -> tuple[Capture, Capture]:
        before = h.read(name)
        h.replace(name, 7.0, rows=[1], positions=[2], units=[5, 9])
        return before, h.read(name)

    _, (before, after) = forward(model, batch=2, setup=setup)
    changed = (before.value != after.value).nonzero().tolist()
    assert sorted(changed) == [[1, 2, 5], [1, 2, 9]]
    assert float(after.value[1, 2, 5]) == 7.0


def test_replace_with_tensor_and_paired(model) -> None:
    name = "blocks.0.resid_post"
    vec = torch.full((model.d_model,), 0.5)

    def setup(h: Hooks) -> Capture:
        h.replace(name, vec, rows=[0, 1], positions=[1, 3], paired=True)
        return h.read(name)

    _, after = forward(model, batch=2, setup=setup)
    assert torch.equal(after.value[0, 1], vec) and torch.equal(after.value[1, 3], vec)
    assert not torch.equal(after.value[0, 3], vec) and not torch.equal(after.value[1, 1], vec)


def test_add_scale_ablate(model) -> None:
    name = "blocks.1.mlp.out"
    _, clean = forward(model, setup=lambda h: h.read(name))
    _, added = forward(model, setup=lambda h: (h.add(name, 1.5, positions=[0]), h.read(name))[1])
    _, scaled = forward(model, setup=lambda h: (h.scale(name, 3.0, units=[2]), h.read(name))[1])
    _, ablated = forward(model, setup=lambda h: (h.ablate(name, positions=[1]), h.read(name))[1])
    _, meaned = forward(model, setup=lambda h: (h.ablate(name, value=clean.value.mean(1)), h.read(name))[1])
    torch.testing.assert_close(added.value[:, 0], clean.value[:, 0] + 1.5)
    torch.testing.assert_close(added.value[:, 1:], clean.value[:, 1:])
    torch.testing.assert_close(scaled.value[..., 2], clean.value[..., 2] * 3.0)
    torch.testing.assert_close(scaled.value[..., 3], clean.value[..., 3])
    assert ablated.value[:, 1].abs().sum() == 0 and ablated.value[:, 0].abs().sum() > 0
    torch.testing.assert_close(meaned.value, clean.value.mean(1, keepdim=True).expand_as(clean.value))


def test_edit_function(model) -> None:
    name = "blocks.0.attn.out"
    seen: list[tuple[int, ...]] = []
    logits, _ = forward(model)
    same, _ = forward(model, setup=lambda h: h.edit(name, lambda x: seen.append(tuple(x.shape))))
    torch.testing.assert_close(same, logits)
    assert seen and seen[0][-1] == model.d_model
    doubled, _ = forward(model, setup=lambda h: h.edit(name, lambda x: x * 2))
    assert (doubled - logits).abs().max() > 1e-4


def test_ablating_a_head_changes_only_its_slice(model) -> None:
    name = "blocks.0.attn.heads"

    def setup(h: Hooks) -> tuple[Capture, Capture]:
        before = h.read(name)
        h.ablate(name, units=[2])
        return before, h.read(name)

    _, (before, after) = forward(model, setup=setup)
    assert after.value[:, :, 2].abs().sum() == 0
    torch.testing.assert_close(after.value[:, :, [0, 1, 3]], before.value[:, :, [0, 1, 3]])


def test_read_keeps_last_forward(model) -> None:
    enc = model.encode(PROMPT)
    with torch.no_grad(), Hooks(model) as h:
        cap = h.read("blocks.0.resid_post")
        model.forward(**enc.inputs(1))
        assert cap.value.shape[0] == 1
        model.forward(**enc.inputs(3))
        assert cap.value.shape[0] == 3


# --------------------------------------------------------------------------- gradients


def test_read_with_grad_matches_input_embeds(model) -> None:
    enc = model.encode(PROMPT)
    with torch.enable_grad(), Hooks(model) as h:
        cap = h.read("embed", grad=True)
        logits = model.forward(**enc.inputs())
        target = logits[0, -1].log_softmax(-1)[5]
        (grad,) = torch.autograd.grad(target, cap.value)
    assert grad.shape == cap.value.shape and grad.abs().sum() > 0
    emb = model.embed_module(enc.input_ids).detach().requires_grad_(True)
    with torch.enable_grad():
        out = model.hf_model(inputs_embeds=emb, attention_mask=enc.attention_mask, use_cache=False).logits
        (expected,) = torch.autograd.grad(out[0, -1].log_softmax(-1)[5], emb)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_grad_read_of_neurons_in_place_model() -> None:
    """Falcon adds attention into its MLP output in place: a grad read must still see the MLP output."""
    model = tiny_model("falcon")
    enc = model.encode(PROMPT)
    with torch.no_grad(), Hooks(model) as h:
        plain = h.read("blocks.1.mlp.out")
        model.forward(**enc.inputs())
    with torch.enable_grad(), Hooks(model) as h:
        tracked = h.read("blocks.1.mlp.out", grad=True)
        logits = model.forward(**enc.inputs())
        (grad,) = torch.autograd.grad(logits[0, -1, 3], tracked.value)
    torch.testing.assert_close(tracked.value.detach(), plain.value)
    assert grad.abs().sum() > 0


def test_grad_through_edit(model) -> None:
    """A differentiable edit: the gradient of a scaled site is the factor times the gradient."""
    enc = model.encode(PROMPT)
    factor = torch.tensor(1.0, requires_grad=True)
    with torch.enable_grad(), Hooks(model) as h:
        h.scale("blocks.1.mlp.out", factor)
        logits = model.forward(**enc.inputs())
        (g,) = torch.autograd.grad(logits[0, -1].sum(), factor)
    assert g.shape == () and torch.isfinite(g)


# --------------------------------------------------------------------------- contexts


def test_nested_contexts(model) -> None:
    enc = model.encode(PROMPT)
    clean, _ = forward(model)
    with torch.no_grad(), Hooks(model) as outer:
        outer.ablate("blocks.0.mlp.out")
        ablated = model.forward(**enc.inputs())
        with Hooks(model) as inner:
            cap = inner.read("blocks.0.mlp.out")
            inner_logits = model.forward(**enc.inputs())
        assert cap.value.abs().sum() == 0  # the outer ablation runs first
        torch.testing.assert_close(inner_logits, ablated)
        torch.testing.assert_close(model.forward(**enc.inputs()), ablated)
    assert (ablated - clean).abs().max() > 1e-4
    torch.testing.assert_close(forward(model)[0], clean)


def test_remove_is_idempotent(model) -> None:
    h = Hooks(model)
    with h:
        h.read("blocks.0.resid_pre")
    h.remove()
    with pytest.raises(RuntimeError, match="inside `with Hooks"):
        h.read("blocks.0.resid_pre")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name, message", [
    ("blocks.0.mlp", "unknown site"),
    ("mlp.out", "unknown site"),
    ("blocks.x.mlp.out", "unknown site"),
    ("", "unknown site"),
    ("blocks.99.mlp.out", "layer 99 is out of range"),
    ("blocks.3.resid_post", "out of range"),
])
def test_bad_sites(name: str, message: str) -> None:
    model = tiny_model("gpt2")
    with Hooks(model) as h, pytest.raises(ValueError, match=message):
        h.read(name)


def test_hooks_outside_context() -> None:
    with pytest.raises(RuntimeError, match="inside `with Hooks"):
        Hooks(tiny_model("gpt2")).ablate("blocks.0.mlp.out")


def test_site_helper() -> None:
    assert site(3, "mlp.neurons") == "blocks.3.mlp.neurons"
    with pytest.raises(ValueError, match="unknown site kind"):
        site(0, "mlp")
