"""Attention over short contexts, for the engines that run thousands of small replays.

Causal tracing re-runs blocks over a few suffix positions for hundreds of rows at once: each
attention call is a batch of tiny problems (a handful of queries against a dozen keys), where
SDPA's CPU kernel spends its time on per-problem overhead and HF's sdpa path first copies the
key/value heads to every query head. `short_attention` computes the same attention as two
batched matmuls per call, with the query heads of a key/value group stacked (no copies). It
takes over only while its context is open, only for models configured with "sdpa", and hands
any call it does not cover (dropout, soft-capping, sinks, bidirectional calls without a mask, long contexts) back
to transformers' own sdpa function, so the model computes what it computes without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

NAME = "knowmri_short"
#: Key lengths up to this use the batched matmuls; SDPA's kernels win on longer contexts.
MAX_KEYS = 64
_PLAIN_KWARGS = {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal",
                 "sliding_window", "output_attentions", "use_cache", "cache_position", "position_embeddings"}


def _forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: query [B, H, q, d], key and value [B, Hk, k, d] -> [B, q, H, d]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, q, d = query.shape
    Hk, k = key.shape[1], key.shape[2]
    mask = attention_mask
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    plain = ((dropout == 0.0 or not module.training) and k <= MAX_KEYS and H % Hk == 0
             and value.shape[-1] == d and key.shape[0] == B and value.shape[:3] == key.shape[:3]
             and all(name in _PLAIN_KWARGS or v is None for name, v in kwargs.items())
             and (mask is None and (q == 1 or q == k and causal)
                  or isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2:] == (q, k)
                  and mask.shape[0] in (1, B) and mask.shape[1] in (1, H)))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    g = H // Hk
    scale = d ** -0.5 if scaling is None else scaling
    dtype = value.dtype
    if dtype in (torch.bfloat16, torch.float16):  # in float32, as SDPA's kernels accumulate: the inputs are small
        query, key, value = query.float(), key.float(), value.float()
    scores = (query.reshape(B, Hk, g * q, d) @ key.transpose(-1, -2)).view(B, Hk, g, q, k).float() * scale
    if mask is None and q > 1:  # sdpa's own reading of no mask: causal, queries and keys aligned
        mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril().view(1, 1, q, k)
    if mask is not None:
        grouped = mask.view(mask.shape[0], 1, 1, q, k) if mask.shape[1] == 1 else mask.view(mask.shape[0], Hk, g, q, k)
        scores = scores.masked_fill(~grouped, float("-inf")) if grouped.dtype == torch.bool else scores + grouped
    weights = scores.softmax(-1).to(value.dtype).view(B, Hk, g * q, k)
    out = (weights @ value).view(B, H, q, d).transpose(1, 2).to(dtype).contiguous()
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, _forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextmanager
def short_attention(model: Any, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> Iterator[bool]:
    """Inside, the model's sdpa attention runs as `_forward`; yields whether it does (False: unchanged).

    Only on the CPU and for models in one of `dtypes`, which each engine sets to where it was measured
    to win on SmolLM2 (CPU, 2 threads): causal tracing's float32 replays (1.2x overall; in bfloat16
    the same trace is 3x slower than with SDPA's kernel); the gradient passes of integrated gradients
    and knowledge circuits and PatchScopes' decoding in bfloat16 (1.15-1.6x: SDPA's CPU backward and
    its per-head batched backward are slow there; in float32 they gain nothing). On a GPU SDPA's
    kernels are the better choice."""
    if model.dtype not in dtypes or model.device.type != "cpu":
        yield False
        return
    configs = {id(c): c for c in [getattr(m, "config", None) for m in model.hf_model.modules()] + [model.config]
               if c is not None and getattr(c, "_attn_implementation", None) == "sdpa"}
    if not configs:
        yield False
        return
    _register()
    for config in configs.values():  # each config on its own (the property's setter recurses into sub-configs)
        config._attn_implementation_internal = NAME
    try:
        yield True
    finally:
        for config in configs.values():
            config._attn_implementation_internal = "sdpa"


def uses_short_attention(*dtypes: torch.dtype) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorates a method's `run(self, model, ...)` to run inside `short_attention(model, dtypes)`."""
    def wrap(run: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(run)
        def inner(self: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
            with short_attention(model, dtypes):
                return run(self, model, *args, **kwargs)
        return inner
    return wrap
