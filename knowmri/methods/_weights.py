"""Per-head attention weights in one uniform shape for every family (not a method).

`head_weights(model, layer)` returns (W_Q, W_K, W_V, W_O): W_Q/W_K/W_V are [n_heads, d_model, d_head]
(x @ W_V[h] is head h's value of a normed residual x), W_O is [n_heads, d_head, d_model]. Key and value
heads shared across query heads (GQA / multi-query) are repeated so that query head h sees kv head
h // (n_heads / n_kv_heads). Where q, k and v live is data (archs.toml `qkv` plus `attn_q`/`attn_k`/
`attn_v` or `attn_qkv`):

    separate            three projections (q_proj, k_proj, v_proj; BERT query/key/value; T5 q/k/v)
    fused_conv1d        one Conv1D [d, 3d] whose output is [q | k | v] (GPT-2's c_attn)
    fused_interleaved   one projection whose output is [heads, 3, d_head] (GPT-NeoX, BLOOM, Falcon-7B style)
    fused_mqa           one projection whose output is [heads + 2, d_head]: q heads, one k, one v (Falcon multi-query)
    fused_grouped       [kv_heads, heads / kv_heads + 2, d_head] (Falcon's new decoder architecture)
    fused_falcon        one of the three above, chosen by the Falcon config

Rotary embeddings (applied to q and k after these projections) and QK-norms (Qwen3, Gemma3) are
not part of the weights; the OV circuit W_V[h] @ W_O[h] is exact for every family.
"""

from __future__ import annotations

from typing import Any

import torch

LAYOUTS = ("separate", "fused_conv1d", "fused_interleaved", "fused_mqa", "fused_grouped", "fused_falcon")


def _paths(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _module(model: Any, layer: int, key: str) -> torch.nn.Module:
    from knowmri.models.arch import resolve

    paths = _paths(model.spec.extra.get(key))
    found = resolve(model.layers[layer], paths) if paths else None
    if found is None:
        raise ValueError(
            f"{model.architecture}: archs.toml gives no {key} module for layer {layer} "
            f"(looked for {', '.join(paths) or 'nothing'})"
        )
    return found[1]


def qkv_layout(model: Any) -> str:
    """The family's q/k/v storage (see the module docstring), resolving Falcon's config-dependent one."""
    layout = model.spec.extra.get("qkv")
    if layout is None:
        raise ValueError(f"{model.architecture} ({model.spec.family}) has no `qkv` entry in archs.toml")
    if layout not in LAYOUTS:
        raise ValueError(
            f"archs.toml: unknown qkv layout {layout!r} for {model.spec.family}; known: {', '.join(LAYOUTS)}"
        )
    if layout == "fused_falcon":
        cfg = model.config
        if getattr(cfg, "new_decoder_architecture", False):
            return "fused_grouped"
        return "fused_mqa" if getattr(cfg, "multi_query", False) else "fused_interleaved"
    return layout


def _weight_and_bias(model: Any, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    weight = model.linear_weight(module)  # [out, in]
    bias = getattr(module, "bias", None)
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return weight, bias


def _split(model: Any, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """[q, k, v] as [heads_x, d_head, d_model] weights and [heads_x, d_head] biases, and n_kv_heads."""
    layout = qkv_layout(model)
    n_heads, d_head = model.n_heads, model.d_head
    if layout == "separate":
        pairs = [_weight_and_bias(model, _module(model, layer, key)) for key in ("attn_q", "attn_k", "attn_v")]
        weights = [w.reshape(-1, d_head, w.shape[-1]) for w, _ in pairs]
        biases = [b.reshape(-1, d_head) for _, b in pairs]
        return weights, biases, weights[1].shape[0]
    weight, bias = _weight_and_bias(model, _module(model, layer, "attn_qkv"))
    d_in = weight.shape[-1]
    if layout == "fused_conv1d":
        w = weight.reshape(3, -1, d_head, d_in)
        b = bias.reshape(3, -1, d_head)
        return [w[0], w[1], w[2]], [b[0], b[1], b[2]], w.shape[1]
    if layout == "fused_interleaved":
        w = weight.reshape(n_heads, 3, d_head, d_in)
        b = bias.reshape(n_heads, 3, d_head)
        return [w[:, i] for i in range(3)], [b[:, i] for i in range(3)], n_heads
    if layout == "fused_mqa":
        w = weight.reshape(n_heads + 2, d_head, d_in)
        b = bias.reshape(n_heads + 2, d_head)
        return (
            [w[:n_heads], w[n_heads : n_heads + 1], w[n_heads + 1 :]],
            [b[:n_heads], b[n_heads : n_heads + 1], b[n_heads + 1 :]],
            1,
        )
    n_kv = weight.shape[0] // d_head - n_heads  # fused_grouped: kv * (group + 2) = heads + 2 kv
    n_kv //= 2
    w = weight.reshape(n_kv, n_heads // n_kv + 2, d_head, d_in)
    b = bias.reshape(n_kv, n_heads // n_kv + 2, d_head)
    return (
        [w[:, :-2].reshape(n_heads, d_head, d_in), w[:, -2], w[:, -1]],
        [b[:, :-2].reshape(n_heads, d_head), b[:, -2], b[:, -1]],
        n_kv,
    )


def n_kv_heads(model: Any, layer: int = 0) -> int:
    """How many distinct key/value heads layer `layer` has (n_heads without GQA / multi-query)."""
    return _split(model, layer)[2]


def _expand(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    if x.shape[0] == n_heads:
        return x
    if n_heads % x.shape[0]:
        raise ValueError(f"{n_heads} query heads cannot share {x.shape[0]} key/value heads evenly")
    return x.repeat_interleave(n_heads // x.shape[0], dim=0)


def output_weights(model: Any, layer: int) -> torch.Tensor:
    """W_O [n_heads, d_head, d_model] of one layer (a view of the output projection: no copy)."""
    w_o = model.linear_weight(model.component(layer, "attn_o"))  # [d_model, heads * d_head]
    return w_o.reshape(w_o.shape[0], model.n_heads, model.d_head).permute(1, 2, 0)


def head_weights(model: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_Q, W_K, W_V) [n_heads, d_model, d_head] and W_O [n_heads, d_head, d_model] of one layer's attention."""
    weights, _, _ = _split(model, layer)
    w_q, w_k, w_v = (_expand(w, model.n_heads).transpose(1, 2) for w in weights)
    return w_q, w_k, w_v, output_weights(model, layer)


def head_biases(model: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b_Q, b_K, b_V) [n_heads, d_head] of one layer's attention (zeros where the family has none)."""
    _, biases, _ = _split(model, layer)
    b_q, b_k, b_v = (_expand(b, model.n_heads) for b in biases)
    return b_q, b_k, b_v


def ov_circuit(model: Any, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head `head`'s value and output maps (W_V [d_model, d_head], W_O [d_head, d_model]); their product is W_OV."""
    if not 0 <= head < model.n_heads:
        raise ValueError(f"head {head} is out of range: layer {layer} has {model.n_heads} heads")
    weights, _, n_kv = _split(model, layer)
    return weights[2][head // (model.n_heads // n_kv)].T, output_weights(model, layer)[head]
