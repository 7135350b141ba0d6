"""The server's caps on one run: predicted time and memory (from the methods' own estimates).

One worker runs every run, so a single run the machine cannot finish (a million SPINE epochs) or
hold would block or sink everyone's. Runs over a cap are refused before they are queued, with the
estimate and the cap in the message; `knowmri serve --max-run-seconds/--max-run-memory` sets them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from knowmri.run_cost import RunCost, estimate_dataset, estimate_run, format_bytes, format_seconds

DEFAULT_MAX_SECONDS = 3600.0  # estimates are per device already, so one hour suits any machine
MEMORY_SHARE = 0.75           # of the machine's RAM (or the GPU's memory) that one run may add


@dataclass(frozen=True)
class RunLimits:
    """Caps on one run's estimate; None means no cap."""

    max_seconds: float | None = DEFAULT_MAX_SECONDS
    max_memory_bytes: int | None = None

    def refusal(self, cost: RunCost) -> str | None:
        """Why a run of this cost is refused (naming the estimate and the cap), or None."""
        what, fewer = "this run", ""
        if len(cost.per_sample) > 1:
            what, fewer = f"this run of {len(cost.per_sample)} samples", ", fewer samples"
        if self.max_seconds is not None and cost.seconds > self.max_seconds:
            return (f"{what} is estimated to take {format_seconds(cost.seconds)} ({cost.slowest()}), more than this "
                    f"server's cap of {format_seconds(self.max_seconds)} per run (knowmri serve --max-run-seconds); "
                    f"choose fewer methods{fewer} or smaller parameters")
        if self.max_memory_bytes is not None and cost.memory_bytes > self.max_memory_bytes:
            biggest = max(cost.methods.items(), key=lambda kv: kv[1].memory_bytes)[0]
            return (f"{what} is estimated to need {format_bytes(cost.memory_bytes)} of memory ({biggest}), more than "
                    f"this server's cap of {format_bytes(self.max_memory_bytes)} per run (knowmri serve "
                    "--max-run-memory); choose smaller parameters")
        return None

    def check(self, model: Any, sample: Any, methods: list[str], params: dict[str, dict[str, Any]] | None) -> str | None:
        """The refusal for running `methods` on `sample` with `model`, or None when it fits the caps."""
        if self.max_seconds is None and self.max_memory_bytes is None:
            return None
        return self.refusal(estimate_run(model, sample, methods, params))

    def check_dataset(self, model: Any, samples: list[Any], methods: list[str] | None,
                      params: dict[str, dict[str, Any]] | None) -> str | None:
        """The refusal for a dataset run over `samples` (its cost: every sample's, added), or None."""
        if self.max_seconds is None and self.max_memory_bytes is None:
            return None
        return self.refusal(estimate_dataset(samples, model, methods, params))

    def to_dict(self) -> dict[str, Any]:
        return {"max_run_seconds": self.max_seconds, "max_run_memory_bytes": self.max_memory_bytes}


def machine_memory(device: str | None = None) -> int | None:
    """Bytes of memory where runs compute: the GPU's for cuda, else the machine's RAM (None if unknown)."""
    if device and device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def default_limits(device: str | None = None, max_seconds: float | None = DEFAULT_MAX_SECONDS,
                   max_memory_bytes: int | None = None) -> RunLimits:
    """Caps for a server on `device`: `max_seconds` (0 or None: none), and `max_memory_bytes` or, when
    not given, a share of the device's memory (0: none)."""
    if max_seconds is not None and (max_seconds != max_seconds or max_seconds < 0):
        raise ValueError(f"the time cap must be a non-negative number of seconds, got {max_seconds}")
    if max_memory_bytes is not None and max_memory_bytes < 0:
        raise ValueError(f"the memory cap must not be negative, got {max_memory_bytes}")
    if max_memory_bytes is None:
        total = machine_memory(device)
        max_memory_bytes = int(total * MEMORY_SHARE) if total else None
    return RunLimits(max_seconds or None, max_memory_bytes or None)
