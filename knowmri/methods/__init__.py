"""Methods: one module per method, registered with `@register_method`.

`knowmri.methods()` (docs/API.md#methods-and-matching) lists them. Since this package shares that name, the module is
made callable: calling it lists the registered methods' descriptions.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self) -> list[dict[str, Any]]:
        from knowmri.methods.base import list_methods

        return [cls.info() for cls in list_methods()]


sys.modules[__name__].__class__ = _CallableModule
