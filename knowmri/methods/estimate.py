"""`Estimate`: what `Method.estimate` returns, the predicted cost of one run.

A plain data type with no dependencies, below both the method framework (`base`) and the cost model
(`costs`) that fills it, so neither imports the other's module to name it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class Estimate:
    """Predicted cost of one run: seconds (on this device) and peak extra memory in bytes."""

    seconds: float
    memory_bytes: int
    forward_passes: int = 0
    backward_passes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
