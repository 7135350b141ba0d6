"""The knowledge-circuits engine (`knowledge_circuits` runs it): edge attribution patching (Syed et al.
2023) and EAP-IG (Hanna et al. 2024) on HF models. The corrupted input is chosen in
`circuits_corruption`, the circuit's size and faithfulness in `circuits_search`.

The graph: `input` (the residual entering block 0: embeddings, plus positions where the model
has them), every attention head `a{l}.h{h}` (its output projected by its slice of the output
projection; the bias belongs to no head), every MLP `m{l}`, and `logits` (reading the final
residual). The score of edge u -> v is (u_corrupted - u_clean) . dM/d(in_v): the change in
u's output times the gradient of the metric with respect to v's own copy of the residual
stream. v's copy is what flows into v alone (not the skip connection):

- head h of layer l: the VJP of that head's output z_h back to the residual entering the layer
  (through the layer norm and the query/key/value maps; with grouped-query attention each
  head gets only its share of the shared keys and values), batched over heads. This is the
  gradient TransformerLens-based EAP gets from split query/key/value inputs; it is exact per
  head, where using the whole layer's attention-input gradient would give every head of a
  layer the same incoming scores. It is taken in three steps (`split_head_vjp`): through the
  attention core to the q/k/v projections' outputs (batched over heads; small), through each
  head's own columns of the projections only (H products of d_head columns, where a VJP of
  the whole projection per head would cost H times the layer's q/k/v backward), then through
  the layer norm (elementwise);
- the MLP of layer l: g(resid_pre) - g(resid_post) - sum_h g(head h), which is exact for both
  sequential (the MLP reads resid_pre + attn) and parallel blocks (it reads resid_pre);
- logits: the gradient at the final residual.

Where a norm follows the output projection (Gemma 2/3), each head's residual contribution is
its share of the normalised branch output within its own run (see `_normed_heads`).

EAP-IG averages the gradients over inputs interpolated between the corrupted and the clean
input embeddings (alpha = k/steps, k = 1..steps, as in Hanna et al.); plain EAP is the k = 1 of
1 case. All interpolation steps and the corrupted run are one batch and one backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from knowmri.hooks import Hooks, site


@dataclass
class Graph:
    """Node names and the edge-score matrix [upstream, downstream] (0 where no edge exists)."""

    upstream: list[str]
    downstream: list[str]
    layers_up: list[int]  # input = -1
    layers_down: list[int]  # logits = n_layers
    scores: torch.Tensor
    valid: torch.Tensor
    metric: list[float]  # per batch row: corrupted, then each interpolation step (the last is clean)
    corrupted_acts: dict[str, torch.Tensor]  # per-layer corrupted attn.heads / mlp.out, for patching


def node_names(n_layers: int, n_heads: int, parallel: bool) -> tuple[list[str], list[str], list[int], list[int], torch.Tensor]:
    """Upstream and downstream node lists (in layer order), their layers, and which edges exist."""
    up, down, lu, ld = ["input"], [], [-1], []
    for layer in range(n_layers):
        names = [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
        up += names
        down += names
        lu += [layer] * len(names)
        ld += [layer] * len(names)
    down.append("logits")
    ld.append(n_layers)
    lu_t, ld_t = torch.tensor(lu)[:, None], torch.tensor(ld)[None, :]
    valid = lu_t < ld_t
    if not parallel:  # a sequential block's MLP reads its own layer's attention output
        is_head_up = torch.tensor([n.startswith("a") for n in up])[:, None]
        is_mlp_down = torch.tensor([n.startswith("m") for n in down])[None, :]
        valid |= (lu_t == ld_t) & is_head_up & is_mlp_down
    return up, down, lu, ld, valid


def answer_metric(logits: torch.Tensor, answer: int, wrong: int, kind: str) -> torch.Tensor:
    """[batch]: the metric at the last position: logit difference of `answer` and `wrong`, log P or P of `answer`."""
    last = logits[:, -1].to(torch.promote_types(logits.dtype, torch.float32))
    if kind == "logit_diff":
        return last[:, answer] - last[:, wrong]
    logp = last.log_softmax(-1)[:, answer]
    return logp if kind == "logprob" else logp.exp()


def forward_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, vocab]: logits of the last position only (saves the vocabulary projection)."""
    return model.run(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), keep=1).logits


def _post_norm(model: Any, layer: int) -> bool:
    """Whether the attention's residual contribution is not its output projection's output (Gemma 2/3 post-norms)."""
    attn_o = model.component(layer, "attn_o")
    return not any(m is attn_o for m in model.component(layer, "attn_out").modules())


def _normed_heads(heads: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """[H, T, d]: per-head projections rescaled so that they add up to the normalised branch output.

    With an RMSNorm after the projection, normed = r * sum_h heads_h elementwise within one run
    (r = gain / rms), so head h's share is r * heads_h, r = normed / sum (0 where the sum vanishes).
    """
    total = heads.sum(0)
    ratio = torch.where(total != 0, normed / torch.where(total != 0, total, torch.ones_like(total)), torch.zeros_like(total))
    return heads * ratio


def head_vjp(z: torch.Tensor, resid: torch.Tensor, grad_z: torch.Tensor) -> torch.Tensor:
    """[H, rows, T, d]: gradient reaching `resid` through each head alone (batched over heads)."""
    n_heads = z.shape[2]
    eye = torch.eye(n_heads, dtype=grad_z.dtype, device=grad_z.device)
    per_head = grad_z[None] * eye[:, None, None, :, None]  # [H, rows, T, H, dh], head h kept in slice h
    try:
        (g,) = torch.autograd.grad(z, resid, per_head, retain_graph=True, is_grads_batched=True)
    except RuntimeError:  # an op without a batching rule: one backward per head
        g = torch.stack([torch.autograd.grad(z, resid, per_head[h], retain_graph=True)[0] for h in range(n_heads)])
    return g


def _own_columns(g_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[H, rows, T, d_in]: g_out [H, rows, T, out] @ weight [out, d_in], head h using only the output
    columns its gradient reaches (its own q/k/v columns; the others are exactly zero, and the
    padding to a common width takes columns whose gradient is zero too)."""
    n_heads = g_out.shape[0]
    used = g_out.reshape(n_heads, -1, g_out.shape[-1]).ne(0).any(1)  # [H, out]
    width = max(1, int(used.sum(1).max()))
    idx = used.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :width]  # [H, width]
    picked = g_out.gather(-1, idx[:, None, None, :].expand(*g_out.shape[:-1], width))
    return torch.einsum("hrtk,hkd->hrtd", picked, weight.to(g_out.dtype)[idx])


def _batched_grad(outputs: list[torch.Tensor], inputs: list[torch.Tensor], cotangents: list[torch.Tensor]
                  ) -> tuple[torch.Tensor | None, ...]:
    """VJPs batched over the leading axis of `cotangents` (one backward per entry where an op has no batching rule)."""
    try:
        return torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        per = [torch.autograd.grad(outputs, inputs, [c[i] for c in cotangents], retain_graph=True, allow_unused=True)
               for i in range(cotangents[0].shape[0])]
        return tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*per))


def split_head_vjp(z: torch.Tensor, resid: torch.Tensor, grad_z: torch.Tensor, projections: list[Any],
                   budget: int = 1 << 28) -> torch.Tensor | None:
    """`head_vjp` summed over rows ([H, T, d]), in three steps that avoid a whole q/k/v backward
    per head: through the attention core to the q/k/v projections' outputs (batched over heads),
    through each head's own columns of the projections, and through the norm to `resid`.
    `projections` holds each q/k/v projection's (input, output, weight [out, in]) from the
    forward; every path from `resid` to `z` must pass through them (the projections of the layer
    that `z` belongs to). Heads go in chunks whose per-head output gradients fit in `budget`
    bytes. None where a step finds no path (the caller then uses `head_vjp`)."""
    n_heads = z.shape[2]
    eye = torch.eye(n_heads, dtype=grad_z.dtype, device=grad_z.device)
    outs = [out for _, out, _ in projections]
    per_head = sum(out.numel() for out in outs) * outs[0].element_size()
    chunk = max(1, min(n_heads, budget // max(per_head, 1)))
    parts = []
    for first in range(0, n_heads, chunk):
        heads = eye[first: first + chunk]  # [h, H]: the heads of this chunk
        cotangent = grad_z[None] * heads[:, None, None, :, None]  # head h's gradient kept in slice h
        g_outs = _batched_grad([z], outs, [cotangent])  # through the attention core only
        if any(g is None for g in g_outs):
            return None
        inputs: list[torch.Tensor] = []
        g_inputs: list[torch.Tensor] = []
        for (x, _, weight), g_out in zip(projections, g_outs):
            g = _own_columns(g_out, weight)  # through head h's columns of the projection
            for i, seen in enumerate(inputs):
                if seen is x:
                    g_inputs[i] = g_inputs[i] + g
                    break
            else:
                inputs.append(x)
                g_inputs.append(g)
        (g_resid,) = _batched_grad(inputs, [resid], g_inputs)  # through the norm
        if g_resid is None:
            return None
        parts.append(g_resid.sum(1))
    return torch.cat(parts)


def _record_projections(model: Any) -> tuple[list[list[Any]], list[Any]]:
    """Forward hooks keeping each layer's q/k/v projections' (input, output, weight [out, in]) in the
    next forward, and the hook handles. A layer's list holds None where a projection is unknown or
    did not run exactly once (`split_head_vjp` is then not used for that layer)."""
    recorded: list[list[Any]] = [[None] for _ in range(model.n_layers)]
    handles: list[Any] = []
    for layer in range(model.n_layers):
        try:
            modules = model.qkv_modules(layer)
        except (ValueError, KeyError, AttributeError):
            continue
        recorded[layer] = [None] * len(modules)
        for i, module in enumerate(modules):
            def keep(mod: Any, args: tuple, kwargs: dict, output: Any, layer: int = layer, i: int = i) -> None:
                x = args[0] if args else next(iter(kwargs.values()), None)
                ok = recorded[layer][i] is None and isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor)
                recorded[layer][i] = (x, output, model.linear_weight(mod).detach()) if ok else False

            handles.append(module.register_forward_hook(keep, with_kwargs=True))
    return recorded, handles


def edge_attribution(model: Any, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor, answer: int, wrong: int, *,
                     alphas: list[float], metric: str = "logit_diff", noise: torch.Tensor | None = None,
                     noise_positions: list[int] | None = None) -> Graph:
    """Edge scores for one prompt (one row) and its corrupted version, averaged over `alphas`.

    `alphas` are the interpolation points between the corrupted (0) and clean (1) input; the
    last should be 1.0, whose row provides the clean activations. With `noise`, the corrupted
    run is the clean prompt with `noise` added to the token embeddings at `noise_positions`.
    """
    if not alphas or alphas[-1] != 1.0:
        raise ValueError("the last interpolation point must be 1.0 (the clean input)")
    n_layers, n_heads = model.n_layers, model.n_heads
    ids = torch.cat([corrupt_ids, clean_ids.expand(len(alphas), -1)]).to(model.device)
    alpha = torch.tensor(alphas)
    with Hooks(model) as h:
        if noise is not None:
            h.add("embed", noise, rows=[0], positions=noise_positions)

        def interpolate(x: torch.Tensor) -> torch.Tensor:
            corrupted = x[:1].detach()
            mixed = x[1:] + (1 - alpha.to(device=x.device, dtype=x.dtype))[:, None, None] * (corrupted - x[1:])
            return torch.cat([x[:1], mixed])

        h.edit(site(0, "resid_pre"), interpolate)
        pre = [h.read(site(layer, "resid_pre"), grad=True) for layer in range(n_layers)]
        post = h.read(site(n_layers - 1, "resid_post"), grad=True)
        heads = [h.read(site(layer, "attn.heads"), grad=True) for layer in range(n_layers)]
        mlps = [h.read(site(layer, "mlp.out")) for layer in range(n_layers)]
        post_normed = [layer for layer in range(n_layers) if _post_norm(model, layer)]
        attn_outs = {layer: h.read(site(layer, "attn.out"), rows=[0, len(alphas)]) for layer in post_normed}
        projections, handles = _record_projections(model)
        try:
            with torch.enable_grad():
                values = answer_metric(forward_logits(model, ids), answer, wrong, metric)
        finally:
            for handle in handles:
                handle.remove()
        with torch.enable_grad():
            tensors = [c.value for c in pre] + [post.value] + [c.value for c in heads]
            grads = torch.autograd.grad(values[1:].mean(), tensors, retain_graph=True)
            g_pre, g_post, g_z = grads[:n_layers], grads[n_layers], grads[n_layers + 1:]
            g_heads = []
            for layer in range(n_layers):
                z, resid = heads[layer].value, pre[layer].value
                known = all(projections[layer])
                g = split_head_vjp(z, resid, g_z[layer], projections[layer]) if known else None
                g_heads.append(head_vjp(z, resid, g_z[layer]).sum(1) if g is None else g)
    acc = torch.promote_types(model.dtype, torch.float32)  # accumulate in float32 at least
    dev = pre[0].value.device  # layers may live on several devices (sharded models)

    def common(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(device=dev, dtype=acc)

    deltas, readers = [common(pre[0].value[0] - pre[0].value[-1])[None]], []
    corrupted_acts: dict[str, torch.Tensor] = {}
    g_next = [common(g.sum(0)) for g in (*g_pre[1:], g_post)]  # the gradient leaving each block
    for layer in range(n_layers):
        z = heads[layer].value.detach()
        w = model.output_weights(layer).detach().to(device=z.device, dtype=z.dtype)  # [H, d_head, d_model]
        if layer in attn_outs:  # a norm after the output projection: split its output in proportion, per run
            outs = [torch.einsum("thk,hkd->htd", z[r], w) for r in (0, -1)]
            runs = [_normed_heads(o, a) for o, a in zip(outs, attn_outs[layer].value)]
            deltas.append(common(runs[0] - runs[1]))
        else:
            deltas.append(common(torch.einsum("thk,hkd->htd", z[0] - z[-1], w)))
        deltas.append(common(mlps[layer].value[0] - mlps[layer].value[-1])[None])
        corrupted_acts[site(layer, "attn.heads")] = z[0]
        corrupted_acts[site(layer, "mlp.out")] = mlps[layer].value[0]
        g_h = common(g_heads[layer])
        readers += [g_h, (common(g_pre[layer].sum(0)) - g_next[layer] - g_h.sum(0))[None]]
    readers.append(g_next[-1][None])
    up, down, lu, ld, valid = node_names(n_layers, n_heads, model.parallel)
    scores = torch.einsum("utd,vtd->uv", torch.cat(deltas), torch.cat(readers)).cpu() * valid
    return Graph(up, down, lu, ld, scores, valid, [float(v) for v in values.detach()], corrupted_acts)


def prune(edges: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    """Only the edges on some path from `input` to `logits` (dangling nodes removed)."""
    from_input, to_logits = {"input"}, {"logits"}
    changed = True
    while changed:
        changed = False
        for src, dst, _ in edges:
            if src in from_input and dst not in from_input:
                from_input.add(dst)
                changed = True
            if dst in to_logits and src not in to_logits:
                to_logits.add(src)
                changed = True
    return [e for e in edges if e[0] in from_input and e[1] in to_logits]
