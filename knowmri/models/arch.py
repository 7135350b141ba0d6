"""Architecture facts as data: where each component lives, per model family (archs.toml)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cache
from importlib import resources
from typing import Any

import tomllib
from torch import nn

_LAYER_KEYS = ("attn", "attn_out", "attn_o", "attn_q", "attn_k", "attn_v", "attn_qkv", "mlp_out", "mlp_in", "mlp_gate",
               "mlp_down", "moe", "moe_router", "moe_experts", "moe_shared", "moe_shared_down")
_ROOT_KEYS = ("embed", "layers", "final_norm", "unembed", "encoder_embed", "encoder_layers")
#: How a family stores its queries, keys and values (archs.toml `qkv`; see `knowmri.models.heads`).
QKV_LAYOUTS = ("separate", "fused_conv1d", "fused_interleaved", "fused_mqa", "fused_grouped", "fused_falcon")


@dataclass(frozen=True)
class ArchSpec:
    """One family's component map. Paths may list alternatives (the first that exists wins)."""

    family: str
    kind: str
    embed: tuple[str, ...]
    layers: tuple[str, ...]
    attn: tuple[str, ...]
    attn_out: tuple[str, ...]
    attn_o: tuple[str, ...]
    mlp_out: tuple[str, ...]
    mlp_in: tuple[str, ...]
    mlp_down: tuple[str, ...]
    unembed: tuple[str, ...]
    final_norm: tuple[str, ...] = ()
    mlp_gate: tuple[str, ...] = ()
    qkv: str | None = None  # one of QKV_LAYOUTS: where attn_q/attn_k/attn_v or attn_qkv apply
    attn_q: tuple[str, ...] = ()
    attn_k: tuple[str, ...] = ()
    attn_v: tuple[str, ...] = ()
    attn_qkv: tuple[str, ...] = ()
    encoder_embed: tuple[str, ...] = ()
    encoder_layers: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    parallel: bool | tuple[str, ...] = False
    conv1d: bool = False
    flat_mlp: bool = False
    logit_softcap: str | None = None
    readout_scale: str | None = None
    moe: tuple[str, ...] = ()  # a layer's mixture-of-experts block (knowmri/models/moe.py); a layer whose
    # moe_experts path is missing is a dense layer
    moe_router: tuple[str, ...] = ()
    moe_experts: tuple[str, ...] = ()
    moe_shared: tuple[str, ...] = ()
    moe_shared_down: tuple[str, ...] = ()
    experts_per_token: tuple[str, ...] = ()  # config keys
    extra: dict[str, Any] = field(default_factory=dict)

    def is_parallel(self, config: Any) -> bool:
        """Whether attention and MLP read the same residual stream (config-dependent for some)."""
        if isinstance(self.parallel, bool):
            return self.parallel
        return any(bool(getattr(config, flag, False)) for flag in self.parallel)

    @property
    def gated(self) -> bool:
        return bool(self.mlp_gate)

    @property
    def is_moe(self) -> bool:
        """Whether the family has mixture-of-experts layers."""
        return bool(self.moe_experts)


def _as_paths(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@cache
def _raw_table() -> dict[str, dict[str, Any]]:
    text = resources.files("knowmri.models").joinpath("archs.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


@cache
def arch_specs() -> dict[str, ArchSpec]:
    """All families, with `like = "..."` entries resolved against their base family."""
    raw = _raw_table()
    names = {f.name for f in fields(ArchSpec)}
    specs: dict[str, ArchSpec] = {}
    for family in raw:
        merged = _merged(raw, family, ())
        kwargs: dict[str, Any] = {"family": family, "extra": {}}
        for key, value in merged.items():
            if key in _LAYER_KEYS or key in _ROOT_KEYS or key in ("architectures", "model_types", "experts_per_token"):
                kwargs[key] = _as_paths(value)
            elif key == "parallel":
                kwargs[key] = value if isinstance(value, bool) else tuple(value)
            elif key in names:
                kwargs[key] = value
            else:
                kwargs["extra"][key] = value
        specs[family] = ArchSpec(**kwargs)
    return specs


def _merged(raw: dict[str, dict[str, Any]], family: str, seen: tuple[str, ...]) -> dict[str, Any]:
    """One family's entry with its `like` chain resolved (a base's own names and types are not inherited)."""
    entry = raw[family]
    merged: dict[str, Any] = {}
    if "like" in entry:
        base = entry["like"]
        if base not in raw:
            raise ValueError(f"archs.toml: {family} is like unknown family {base!r}")
        if base in seen:
            raise ValueError(f"archs.toml: {family} is like itself through {' -> '.join(seen)}")
        merged.update({k: v for k, v in _merged(raw, base, (*seen, family)).items()
                       if k not in ("architectures", "model_types")})
    merged.update({k: v for k, v in entry.items() if k != "like"})
    return merged


def find_spec(architecture: str | None, model_type: str | None = None) -> ArchSpec | None:
    """The family for an HF architecture class name, else for a model_type; None if unknown."""
    specs = arch_specs().values()
    if architecture:
        for spec in specs:
            if architecture in spec.architectures:
                return spec
    if model_type:
        for spec in specs:
            if model_type in spec.model_types:
                return spec
    return None


def get_module(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted path, or None when any part is missing."""
    module: Any = root
    for part in path.split("."):
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            index = int(part)
            module = module[index] if index < len(module) else None
        else:
            module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def resolve(root: nn.Module, paths: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The first of `paths` that exists under `root`, with its module."""
    for path in paths:
        module = get_module(root, path)
        if module is not None:
            return path, module
    return None


def missing_paths(model: nn.Module, spec: ArchSpec) -> list[str]:
    """Every required component of `spec` that `model` lacks, by name (for clear errors)."""
    missing = []
    for key in ("embed", "layers", "unembed"):
        if resolve(model, getattr(spec, key)) is None:
            missing.append(f"{key} ({' | '.join(getattr(spec, key))})")
    if spec.final_norm and resolve(model, spec.final_norm) is None:
        missing.append(f"final_norm ({' | '.join(spec.final_norm)})")
    found = resolve(model, spec.layers)
    if found is not None and len(found[1]) > 0:
        block = found[1][0]
        moe = bool(spec.moe_experts) and resolve(block, spec.moe_experts) is not None
        mlp_keys = ("moe_router", "moe_experts") if moe else ("mlp_in", "mlp_down")
        for key in ("attn", "attn_out", "attn_o", "mlp_out", *mlp_keys):
            if resolve(block, getattr(spec, key)) is None:
                missing.append(f"layer.{key} ({' | '.join(getattr(spec, key))})")
    return missing


def infer_spec(model: nn.Module) -> ArchSpec | None:
    """A known family whose module names the model follows, for unregistered architectures."""
    config = getattr(model, "config", None)
    kind_hint = "seq2seq" if getattr(config, "is_encoder_decoder", False) else None
    for spec in arch_specs().values():
        if kind_hint and spec.kind != kind_hint:
            continue
        if not missing_paths(model, spec):
            return spec
    return None
