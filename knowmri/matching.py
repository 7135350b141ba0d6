"""`match`: which methods apply to a sample (or a dataset) and a model, and why the others do not."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from knowmri.methods.base import list_methods
from knowmri.sample import Sample, as_sample

log = logging.getLogger(__name__)


@dataclass
class Match:
    """One method's eligibility: `reasons` says why it cannot run (empty when eligible)."""

    name: str
    title: str
    path: list[str]
    eligible: bool
    reasons: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    missing_capabilities: list[str] = field(default_factory=list)
    estimate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _keys_of(target: Any) -> tuple[set[str], Sample | None]:
    if hasattr(target, "support_keys") and not isinstance(target, (Sample, dict, str)):
        keys = set(target.support_keys)
        first = target[0] if len(target) else None
        return keys, first
    sample = as_sample(target)
    return set(sample.keys()), sample


def match(target: Any, model: Any = None, *, estimate: bool = False) -> list[Match]:
    """Every registered method with `eligible` and, when not, the reasons (docs/API.md#methods-and-matching).

    `target` is a Sample (or a mapping or prompt string) or a Dataset (its `support_keys`, the keys
    every record provides, decide). With a model, capabilities and method-specific checks count too.
    """
    keys, sample = _keys_of(target)
    capabilities = model.capabilities if model is not None else None
    out = []
    for cls in list_methods():
        method = cls()
        missing_keys = [k for k in cls.requires_keys if k not in keys]
        missing_caps = [c for c in cls.requires_capabilities if capabilities is not None and c not in capabilities]
        reasons = [f"needs the key {k!r}" for k in missing_keys]
        reasons += [f"the model lacks the capability {c!r}" for c in missing_caps]
        if not reasons and model is not None and sample is not None:
            try:
                reasons += method.check(model, sample)
            except ValueError as err:
                reasons.append(str(err))
        m = Match(cls.name, cls.title, list(cls.path), not reasons, reasons, missing_keys, missing_caps)
        if estimate and m.eligible and model is not None and sample is not None:
            try:
                m.estimate = method.estimate(model, sample).to_dict()
            except Exception as err:  # an estimate must never hide the match itself
                m.estimate = {"error": str(err)}
        out.append(m)
    return out


def estimate_dataset(samples: Iterable[Any], model: Any, methods: list[str] | None = None,
                     params: dict[str, dict] | None = None) -> dict[str, Any]:
    """The predicted cost of diagnosing several samples: the sum of each sample's method estimates.

    On each sample, the chosen `methods` (every eligible one when None) that apply to it count, with
    their `params`. Returns the total `seconds`, `per_sample` seconds (in order, for dealing them over
    processes), the largest `memory_bytes`, and `methods` (seconds per method)."""
    from knowmri.methods.base import get_method

    params = params or {}
    per_sample: list[float] = []
    per_method: dict[str, float] = {}
    memory = 0
    for sample in samples:
        seconds = 0.0
        for m in match(sample, model):
            if not m.eligible or (methods is not None and m.name not in methods):
                continue
            method = get_method(m.name)
            try:
                cost = method.estimate(model, as_sample(sample), method.Params.from_dict(params.get(m.name)))
            except Exception as err:  # a method without an estimate for this sample adds nothing
                log.debug("no estimate of %s: %s", m.name, err)
                continue
            seconds += cost.seconds
            per_method[m.name] = per_method.get(m.name, 0.0) + cost.seconds
            memory = max(memory, int(cost.memory_bytes))
        per_sample.append(seconds)
    return {"seconds": sum(per_sample), "per_sample": per_sample, "memory_bytes": memory, "methods": per_method}
