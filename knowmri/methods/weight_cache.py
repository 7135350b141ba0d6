"""Values derived from a model's weights (row norms and the like), computed once per process and weight.

`weight_derived` keys a value by the weight tensor itself and recomputes it when the tensor is edited in
place (its version counter), moved or freed; `row_norms` is the one every vocabulary read-out shares.
`tensor_version` is the version counter that the clean-pass cache (`common.clean_pass`) checks too.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_DERIVED: dict[tuple[int, str], tuple[Any, tuple, Any]] = {}


def tensor_version(t: torch.Tensor) -> Any:
    """A tensor's version counter (bumped by every in-place edit); a never-equal object for inference
    tensors (weights created under `torch.inference_mode`), which have none: no caching for those."""
    try:
        return t._version
    except RuntimeError:
        return object()


def weight_derived(weight: torch.Tensor, name: str, fn: Any) -> Any:
    """`fn(weight)` (e.g. row norms of a weight matrix), computed once per process and weight tensor and
    recomputed when the tensor is edited in place (version counter), moved or freed."""
    key = (id(weight), name)
    state = (tensor_version(weight), weight.data_ptr(), weight.dtype, str(weight.device), tuple(weight.shape))
    found = _DERIVED.get(key)
    if found is not None and found[0]() is weight and found[1] == state:
        return found[2]
    for stale in [k for k, (ref, _, _) in list(_DERIVED.items()) if ref() is None]:
        _DERIVED.pop(stale, None)
    with torch.inference_mode():
        value = fn(weight)
    _DERIVED[key] = (weakref.ref(weight), state, value)
    return value


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """[rows] float32 norms of a weight matrix's rows (an embedding's or unembedding's tokens), computed once
    per weight (`weight_derived`; pass the parameter itself, not a `.detach()`ed view)."""
    return weight_derived(weight, "row_norms", lambda w: torch.linalg.vector_norm(w, dim=-1, dtype=torch.float32))


def embedding_std(model: Any) -> float:
    """The standard deviation of the token embeddings' entries as the embedding module outputs them (the
    noise unit of causal tracing and noise corruptions), over the whole vocabulary.

    ROME measures the std of the embeddings of a body of subject tokens; the whole vocabulary is a
    sample-independent, deterministic stand-in (computed in chunks, in float64). It is read from the
    module's output, not its weight, because the noise is added to that output: Gemma's embedding scales
    its rows by sqrt(d_model) (about 25x for Gemma-3-270M), so the weight's std would make the noise that
    much too weak to corrupt the subject.
    """
    module = model.embed_module

    def std(weight: torch.Tensor) -> float:
        total = total_sq = 0.0
        for start in range(0, weight.shape[0], 8192):
            ids = torch.arange(start, min(start + 8192, weight.shape[0]), device=weight.device)
            c = module(ids).double()
            total += float(c.sum())
            total_sq += float((c * c).sum())
        n = weight.numel()
        return max(total_sq / n - (total / n) ** 2, 0.0) ** 0.5 * (n / max(n - 1, 1)) ** 0.5

    return weight_derived(module.weight, "embedding_std", std)


def clear() -> None:
    """Forget every derived value (the next use computes it again, as in a fresh process)."""
    _DERIVED.clear()
