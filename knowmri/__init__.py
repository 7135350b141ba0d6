"""knowmri: reveal and interpret the knowledge mechanisms of large language models.

    import knowmri as km
    model = km.load_model("smollm2-135m")
    sample = km.Sample(prompt="The Eiffel Tower is located in the city of", ground_truth=" Paris",
                       triple_subject="Eiffel Tower")
    report = km.diagnose(sample, model)
    report.save("report/")

Names are imported lazily so `import knowmri` stays fast and free of side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "knowmri.models.loading",
    "Model": "knowmri.models.model",
    "Sample": "knowmri.sample",
    "from_text": "knowmri.data",
    "load_dataset": "knowmri.data",
    "Dataset": "knowmri.data",
    "suggest": "knowmri.data",
    "match": "knowmri.matching",
    "diagnose": "knowmri.diagnosis",
    "Report": "knowmri.report.report",
    "Hooks": "knowmri.hooks",
    "register_method": "knowmri.methods.base",
    "Method": "knowmri.methods.base",
    "Params": "knowmri.methods.base",
    "MethodResult": "knowmri.report.result",
    "localize": "knowmri.localize",
    "enhance": "knowmri.localize",
}

__all__ = sorted([*_EXPORTS, "datasets", "methods", "presets", "__version__"])


def presets() -> list[dict[str, Any]]:
    """The presets knowmri can load by name, and whether their package is installed."""
    from knowmri.models.presets import PRESETS, preset_available

    return [{"name": p.name, "title": p.title, "installed": preset_available(p.name), "install": p.install}
            for p in PRESETS.values()]


def datasets() -> list[dict[str, Any]]:
    """The built-in datasets with their keys and sizes."""
    from knowmri.data import datasets as _datasets

    return _datasets()


def __getattr__(name: str) -> Any:
    if name == "methods":  # the subpackage, callable: km.methods() lists the methods
        return importlib.import_module("knowmri.methods")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'knowmri' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
