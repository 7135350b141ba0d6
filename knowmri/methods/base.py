"""The method framework: `Method`, its typed hyper-parameters and the registry (`MethodResult` re-exported)."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import pkgutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from knowmri.methods.estimate import Estimate  # re-exported: methods import it from here
from knowmri.report.result import MethodResult  # re-exported: methods import it from here
from knowmri.sample import Sample


@dataclass
class Params:
    """Base of every method's hyper-parameter dataclass (one per method; feeds API, CLI and UI)."""

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Params:
        """Defaults overridden by `values`, type-checked; unknown names are an error."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(known) or 'none'}")
        params = cls()
        for name, value in values.items():
            _finite(name, value)
            setattr(params, name, _finite(name, _coerce(name, value, getattr(params, name))))
        params.validate()
        return params

    def validate(self) -> None:
        """Raise ValueError for out-of-range values (override per method)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def schema(cls) -> list[dict[str, Any]]:
        """Each field's name, type, default and help (from `metadata={"help": ...}`), for forms and CLIs."""
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append({"name": f.name, "type": type(default).__name__, "default": default,
                        "help": f.metadata.get("help", ""), "choices": f.metadata.get("choices")})
        return out


def _finite(name: str, value: Any) -> Any:
    """`value`, unless it is (or holds) NaN or an infinity: no hyper-parameter means them, and JSON cannot hold them."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"parameter {name!r} must be a finite number, got {item!r}")
    return value


def _coerce(name: str, value: Any, default: Any) -> Any:
    if default is None or value is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, int) and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (list, tuple)):
            items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
            return type(default)(items)
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"parameter {name!r} must be of type {type(default).__name__}, got {value!r}") from None
    return value


class Method:
    """A knowledge-interpretation method. Subclass, set the class attributes, implement `run`.

    `requires_keys` must all be present in the sample; `requires_capabilities` in the model.
    `check` may add sample- or model-specific reasons not to run (e.g. subject not in prompt).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    path: ClassVar[tuple[str, ...]]
    paper: ClassVar[str] = ""
    description: ClassVar[str] = ""
    requires_keys: ClassVar[tuple[str, ...]] = ("prompt",)
    requires_capabilities: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[Params]] = Params
    #: The method reads the sample's shared clean forward pass (`common.clean_pass`), so a dataset run may
    #: compute that pass for several samples in one batch beforehand (`common.clean_passes`).
    reads_clean_pass: ClassVar[bool] = False

    def check(self, model: Any, sample: Sample) -> list[str]:
        """Extra reasons this method cannot run on this model and sample (empty: it can)."""
        return []

    def estimate(self, model: Any, sample: Sample, params: Params | None = None) -> Estimate:
        """Predicted cost; the default assumes one forward pass."""
        from knowmri.methods.costs import forward_cost

        return forward_cost(model, sample, forward=1)

    def run(self, model: Any, sample: Sample, params: Params, ctx: RunContext) -> MethodResult:
        raise NotImplementedError

    def run_batch(self, model: Any, samples: list[Sample], params: Params,
                  contexts: list[RunContext]) -> list[MethodResult] | None:
        """`run` on several samples at once (one context each), sharing forward passes across them; or None
        where this method, or this model, has no batched form (a dataset run then runs them one by one).
        Each result must be the one `run` gives that sample alone, up to float rounding."""
        return None

    def new_result(self, params: Params) -> MethodResult:
        return MethodResult(method=self.name, path=list(self.path), params=params.to_dict())

    @classmethod
    def info(cls) -> dict[str, Any]:
        return {"name": cls.name, "title": cls.title, "path": list(cls.path), "paper": cls.paper,
                "description": cls.description, "requires_keys": list(cls.requires_keys),
                "requires_capabilities": list(cls.requires_capabilities), "params": cls.Params.schema()}


class RunContext:
    """What a running method may use besides model and sample: progress and a per-sample cache."""

    def __init__(self, progress: Callable[[float, str], None] | None = None, cache: dict | None = None, seed: int = 0) -> None:
        self._progress = progress
        self.cache: dict = cache if cache is not None else {}
        self.seed = seed

    def progress(self, fraction: float, message: str = "") -> None:
        if self._progress is not None:
            self._progress(max(0.0, min(1.0, fraction)), message)


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False
_LOADING = threading.RLock()  # other threads wait while one imports the methods (no half-empty registry)
_IMPORTING = False
M = TypeVar("M", bound=type[Method])


def register_method(cls: M | None = None, *, replace: bool = False) -> Any:
    """Class decorator that adds a method to the registry; a duplicate name is an error unless `replace`."""

    def deco(klass: M) -> M:
        for attr in ("name", "title", "path"):
            if not getattr(klass, attr, None):
                raise ValueError(f"{klass.__name__} must define `{attr}` to be registered")
        if not dataclasses.is_dataclass(klass.Params):
            raise ValueError(f"{klass.__name__}.Params must be a dataclass")
        existing = _REGISTRY.get(klass.name)
        if existing is not None and existing is not klass and not replace and existing.__qualname__ != klass.__qualname__:
            raise ValueError(f"a method named {klass.name!r} is already registered ({existing.__module__}); pass replace=True")
        _REGISTRY[klass.name] = klass
        return klass

    return deco(cls) if cls is not None else deco


def unregister_method(name: str) -> None:
    """Remove a method from the registry (for plug-in tests and reloads)."""
    _REGISTRY.pop(name, None)


def load_builtin_methods() -> None:
    """Import every module in knowmri.methods, then plug-ins from entry points and $KNOWMRI_PLUGINS."""
    global _LOADED, _IMPORTING
    if _LOADED:
        return
    with _LOADING:
        if _LOADED or _IMPORTING:  # _IMPORTING: a module being imported lists methods (same thread)
            return
        _IMPORTING = True
        try:
            _import_methods()
        finally:
            _LOADED, _IMPORTING = True, False


def _import_methods() -> None:
    for info in pkgutil.iter_modules([os.path.dirname(__file__)]):
        if info.name not in ("base", "common"):
            importlib.import_module(f"knowmri.methods.{info.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group="knowmri.methods"):
        ep.load()
    for module in filter(None, (m.strip() for m in os.environ.get("KNOWMRI_PLUGINS", "").split(","))):
        importlib.import_module(module)


def get_method(name: str) -> Method:
    """An instance of the registered method `name` (clear error listing the known names)."""
    load_builtin_methods()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def list_methods() -> list[type[Method]]:
    """All registered method classes, in taxonomy order (External before Internal), then by name."""
    load_builtin_methods()
    return sorted(_REGISTRY.values(), key=lambda m: (tuple(m.path), m.name))
