"""Per-head attention weights in one uniform shape for every family: a part of `Model` (`HeadWeights`).

`model.head_weights(layer)` returns (W_Q, W_K, W_V, W_O): W_Q/W_K/W_V are [n_heads, d_model, d_head]
(x @ W_V[h] is head h's value of a normed residual x), W_O is [n_heads, d_head, d_model]. Key and value
heads shared across query heads (GQA / multi-query) are repeated so that query head h sees kv head
h // (n_heads / n_kv_heads). Where q, k and v live is data (archs.toml `qkv` plus `attn_q`/`attn_k`/
`attn_v` or `attn_qkv`, typed fields of `ArchSpec`):

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
from torch import nn

from knowmri.models.arch import QKV_LAYOUTS, ArchSpec


class HeadWeights:
    """The q/k/v layout and per-head weights of a `Model` (which mixes this in; it provides `spec`,
    `config`, `architecture`, `n_heads`, `d_head`, `component` and `linear_weight`)."""

    spec: ArchSpec
    config: Any
    architecture: str
    n_heads: int
    d_head: int

    def qkv_layout(self) -> str:
        """The family's q/k/v storage (see the module docstring), resolving Falcon's config-dependent one."""
        layout = self.spec.qkv
        if layout is None:
            raise ValueError(f"{self.architecture} ({self.spec.family}) has no `qkv` entry in archs.toml")
        if layout not in QKV_LAYOUTS:
            raise ValueError(
                f"archs.toml: unknown qkv layout {layout!r} for {self.spec.family}; known: {', '.join(QKV_LAYOUTS)}"
            )
        if layout == "fused_falcon":
            cfg = self.config
            if getattr(cfg, "new_decoder_architecture", False):
                return "fused_grouped"
            return "fused_mqa" if getattr(cfg, "multi_query", False) else "fused_interleaved"
        return layout

    def qkv_modules(self, layer: int) -> list[nn.Module]:
        """The modules computing a layer's queries, keys and values (one fused module or three)."""
        keys = ("attn_q", "attn_k", "attn_v") if self.qkv_layout() == "separate" else ("attn_qkv",)
        return [self.component(layer, key) for key in keys]  # type: ignore[attr-defined]

    def n_kv_heads(self, layer: int = 0) -> int:
        """How many distinct key/value heads layer `layer` has (n_heads without GQA / multi-query)."""
        return self._split_qkv(layer)[2]

    def output_weights(self, layer: int) -> torch.Tensor:
        """W_O [n_heads, d_head, d_model] of one layer (a view of the output projection: no copy)."""
        w_o = self.linear_weight(self.component(layer, "attn_o"))  # type: ignore[attr-defined]  # [d_model, heads * d_head]
        return w_o.reshape(w_o.shape[0], self.n_heads, self.d_head).permute(1, 2, 0)

    def head_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_Q, W_K, W_V) [n_heads, d_model, d_head] and W_O [n_heads, d_head, d_model] of one layer's attention."""
        weights, _, _ = self._split_qkv(layer)
        w_q, w_k, w_v = (_expand(w, self.n_heads).transpose(1, 2) for w in weights)
        return w_q, w_k, w_v, self.output_weights(layer)

    def head_biases(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b_Q, b_K, b_V) [n_heads, d_head] of one layer's attention (zeros where the family has none)."""
        _, biases, _ = self._split_qkv(layer)
        b_q, b_k, b_v = (_expand(b, self.n_heads) for b in biases)
        return b_q, b_k, b_v

    def ov_circuit(self, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head `head`'s value and output maps (W_V [d_model, d_head], W_O [d_head, d_model]); their product is W_OV."""
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head {head} is out of range: layer {layer} has {self.n_heads} heads")
        weights, _, n_kv = self._split_qkv(layer)
        return weights[2][head // (self.n_heads // n_kv)].T, self.output_weights(layer)[head]

    def _weight_and_bias(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.linear_weight(module)  # type: ignore[attr-defined]  # [out, in]
        bias = getattr(module, "bias", None)
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return weight, bias

    def _split_qkv(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """[q, k, v] as [heads_x, d_head, d_model] weights and [heads_x, d_head] biases, and n_kv_heads."""
        layout = self.qkv_layout()
        n_heads, d_head = self.n_heads, self.d_head
        if layout == "separate":
            pairs = [self._weight_and_bias(m) for m in self.qkv_modules(layer)]
            weights = [w.reshape(-1, d_head, w.shape[-1]) for w, _ in pairs]
            biases = [b.reshape(-1, d_head) for _, b in pairs]
            return weights, biases, weights[1].shape[0]
        weight, bias = self._weight_and_bias(self.qkv_modules(layer)[0])
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


def _expand(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    if x.shape[0] == n_heads:
        return x
    if n_heads % x.shape[0]:
        raise ValueError(f"{n_heads} query heads cannot share {x.shape[0]} key/value heads evenly")
    return x.repeat_interleave(n_heads // x.shape[0], dim=0)
