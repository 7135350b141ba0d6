"""The predicted cost of a diagnosis: each chosen method's `estimate`, added up, for caps and warnings.

Methods run one after another and free their buffers in between, so a run's time is the sum of
its methods' times and its memory the largest method's peak.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from knowmri.methods.base import Estimate, get_method

log = logging.getLogger(__name__)


@dataclass
class RunCost:
    """Predicted seconds and peak extra memory of a run, with each method's own estimate."""

    seconds: float = 0.0
    memory_bytes: int = 0
    methods: dict[str, Estimate] = field(default_factory=dict)

    def scaled(self, samples: int) -> RunCost:
        """The cost of running the same methods on `samples` records one after another."""
        return RunCost(self.seconds * samples, self.memory_bytes, dict(self.methods))

    def slowest(self, n: int = 3) -> str:
        """The `n` costliest methods with their times, e.g. 'spine 69.9 h, causal_tracing 17 s'."""
        ranked = sorted(self.methods.items(), key=lambda kv: -kv[1].seconds)[:n]
        return ", ".join(f"{name} {format_seconds(e.seconds)}" for name, e in ranked)

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "memory_bytes": self.memory_bytes,
                "methods": {name: e.to_dict() for name, e in self.methods.items()}}


def estimate_run(model: Any, sample: Any, methods: list[str], params: dict[str, dict[str, Any]] | None = None) -> RunCost:
    """The cost of running `methods` (with their `params` overrides) on one sample.

    Parameters must already be valid (a ValueError is raised otherwise). A method whose estimate
    fails (an input it cannot take, say) is left out: its run reports that failure itself."""
    cost = RunCost()
    for name in methods:
        method = get_method(name)
        values = (params or {}).get(name)
        p = method.Params.from_dict(values)
        try:
            estimate = method.estimate(model, sample, p)
        except Exception as err:  # an estimate never blocks a run: the run itself says what is wrong
            log.debug("no estimate for %s: %s", name, err)
            continue
        cost.methods[name] = estimate
        cost.seconds += max(0.0, float(estimate.seconds))
        cost.memory_bytes = max(cost.memory_bytes, int(estimate.memory_bytes))
    return cost


def format_seconds(seconds: float) -> str:
    """A duration for people: '40 s', '12 min', '5,528 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.2f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours = seconds / 3600
    return f"{hours:,.1f} h" if hours < 100 else f"{hours:,.0f} h"


def format_bytes(n: float) -> str:
    """A size for people: '820 MiB', '12.5 GiB'."""
    if n < 1 << 30:
        return f"{n / (1 << 20):,.0f} MiB"
    return f"{n / (1 << 30):,.1f} GiB"
