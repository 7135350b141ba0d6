"""Dataset-level work: capability localisation and enhancement, data-parallel (docs/localize.md, docs/API.md).

    import knowmri as km
    loc = km.localize(km.load_dataset("gsm8k"), model, top_k=50)
    loc.save("out/")                       # localization.json, index.html, scores.npz
    enh = km.enhance(km.load_dataset("gsm8k"), model, loc)   # located vs random vs base

Importing this package binds `knowmri.localize` to it, so the package itself is callable:
`km.localize(...)` runs `knowmri.localize.capability.localize`.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from knowmri.localize.capability import Localization, compare_localizations, localize, neuron_contributions
from knowmri.localize.tuning import Enhancement, apply_deltas, enhance, load_deltas, merge_deltas, save_deltas

__all__ = ["Enhancement", "Localization", "apply_deltas", "compare_localizations", "enhance", "load_deltas",
           "localize", "merge_deltas", "neuron_contributions", "save_deltas"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Localization:
        return localize(*args, **kwargs)

    __call__.__doc__ = localize.__doc__


sys.modules[__name__].__class__ = _CallableModule
