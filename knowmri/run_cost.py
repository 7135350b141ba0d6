"""The predicted cost of a diagnosis: each chosen method's `estimate`, added up, for caps and warnings.

Methods run one after another and free their buffers in between, so a run's time is the sum of
its methods' times and its memory the largest method's peak. A dataset run is its samples' runs one
after another: the sum of each sample's cost (`estimate_dataset`), with each sample's seconds kept
so the share of the slowest process can be told when the samples are dealt over several.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from knowmri.matching import match
from knowmri.methods.base import Estimate, get_method
from knowmri.sample import as_sample

log = logging.getLogger(__name__)


@dataclass
class RunCost:
    """Predicted seconds and peak extra memory of a run, with each method's own estimate.

    For a dataset run, `methods` holds each method's estimates summed over the samples (memory: the
    largest) and `per_sample` each sample's seconds, in order."""

    seconds: float = 0.0
    memory_bytes: int = 0
    methods: dict[str, Estimate] = field(default_factory=dict)
    per_sample: list[float] = field(default_factory=list)

    def add(self, name: str, estimate: Estimate) -> None:
        """Count one more run of method `name` (its time adds up, its memory is a peak)."""
        seconds = max(0.0, float(estimate.seconds))
        self.seconds += seconds
        self.memory_bytes = max(self.memory_bytes, int(estimate.memory_bytes))
        old = self.methods.get(name)
        self.methods[name] = estimate if old is None else Estimate(
            old.seconds + seconds, max(old.memory_bytes, int(estimate.memory_bytes)),
            old.forward_passes + estimate.forward_passes, old.backward_passes + estimate.backward_passes)

    def per_process(self, world: int) -> float:
        """The seconds of the busiest of `world` processes when the samples are dealt round-robin over them."""
        if world <= 1 or not self.per_sample:
            return self.seconds
        return max(sum(self.per_sample[r::world]) for r in range(world))

    def slowest(self, n: int = 3) -> str:
        """The `n` costliest methods with their times, e.g. 'spine 69.9 h, causal_tracing 17 s'."""
        ranked = sorted(self.methods.items(), key=lambda kv: -kv[1].seconds)[:n]
        return ", ".join(f"{name} {format_seconds(e.seconds)}" for name, e in ranked)

    def to_dict(self) -> dict[str, Any]:
        out = {"seconds": self.seconds, "memory_bytes": self.memory_bytes,
               "methods": {name: e.to_dict() for name, e in self.methods.items()}}
        if self.per_sample:
            out["samples"] = len(self.per_sample)
            out["per_sample"] = list(self.per_sample)
        return out


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
        cost.add(name, estimate)
    return cost


def estimate_dataset(samples: Iterable[Any], model: Any, methods: list[str] | None = None,
                     params: dict[str, dict[str, Any]] | None = None) -> RunCost:
    """The cost of diagnosing several samples one after another: the sum of each sample's `estimate_run`.

    On each sample, the chosen `methods` (every eligible one when None) that apply to it count, with
    their `params`; `per_sample` keeps each sample's seconds, in order."""
    total = RunCost()
    for sample in samples:
        sample = as_sample(sample)
        names = [m.name for m in match(sample, model) if m.eligible and (methods is None or m.name in methods)]
        one = estimate_run(model, sample, names, params)
        for name, estimate in one.methods.items():
            total.add(name, estimate)
        total.per_sample.append(one.seconds)
    return total


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
