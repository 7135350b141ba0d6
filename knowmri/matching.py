"""`match`: which methods apply to a sample (or a dataset) and a model, and why the others do not."""

from __future__ import annotations

import logging
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

