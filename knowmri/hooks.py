"""The hooks engine: read, replace, add to, scale or ablate any canonical site, batched.

Canonical sites, shared by every method (layer `l` is 0-based):

    embed                      token embeddings (the output of the embedding module)  [B, T, d_model]
    blocks.{l}.resid_pre       the residual stream entering block l                   [B, T, d_model]
    blocks.{l}.resid_post      the residual stream leaving block l                    [B, T, d_model]
    blocks.{l}.attn.out        the attention's contribution (before the residual add) [B, T, d_model]
    blocks.{l}.attn.heads      per-head outputs, the input of the output projection   [B, T, H, d_head]
    blocks.{l}.mlp.out         the MLP's contribution (before the residual add)       [B, T, d_model]
    blocks.{l}.mlp.neurons     the MLP's hidden units, the input of the down proj.    [B, T, d_mlp]
    final_norm                 the output of the final norm                           [B, T, d_model]

Mixture-of-experts layers (`model.moe_layers`) have, besides `mlp.out` (the whole MoE block's output):

    blocks.{l}.moe.router              the router logits (editing them re-routes)     [B, T, n_experts]
    blocks.{l}.moe.experts.{e}.neurons expert e's hidden units, the input of its down
                                       projection; zero at tokens not routed to e      [B, T, d_expert]
    blocks.{l}.moe.experts.{e}.out     expert e's output times its routing weight (its
                                       share of mlp.out); zero at tokens not routed    [B, T, d_model]
    blocks.{l}.moe.shared.neurons      the shared expert's hidden units (if any)       [B, T, d_shared]
    blocks.{l}.moe.shared.out          the shared expert's output (before Qwen2-MoE's
                                       sigmoid gate)                                   [B, T, d_model]

Experts run on their routed tokens only (edits at other tokens change nothing); see docs/SITES.md.

For seq2seq models, blocks are the decoder's. Hooks exist only inside `Hooks` (a context
manager) and are removed on exit, whatever happens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from knowmri.models import moe

Index = int | Sequence[int] | slice | torch.Tensor | None
Edit = Callable[[torch.Tensor], torch.Tensor | None]

_SITE = re.compile(r"^blocks\.(\d+)\.(resid_pre|resid_post|attn\.out|attn\.heads|mlp\.out|mlp\.neurons|moe\.router|"
                   r"moe\.shared\.neurons|moe\.shared\.out|moe\.experts\.(\d+)\.(neurons|out))$")
SITE_KINDS = ("resid_pre", "resid_post", "attn.out", "attn.heads", "mlp.out", "mlp.neurons")
#: Per-layer sites of mixture-of-experts layers (an expert's own sites: `expert_site`).
MOE_SITE_KINDS = ("moe.router", "moe.shared.neurons", "moe.shared.out")
EXPERT_SITE_KINDS = ("neurons", "out")


def site(layer: int, kind: str) -> str:
    """The canonical site name for a layer and kind, e.g. site(3, "mlp.neurons")."""
    if kind not in SITE_KINDS and kind not in MOE_SITE_KINDS:
        raise ValueError(f"unknown site kind {kind!r}; expected one of {', '.join(SITE_KINDS + MOE_SITE_KINDS)}")
    return f"blocks.{layer}.{kind}"


def expert_site(layer: int, expert: int, kind: str = "neurons") -> str:
    """The site of one expert of a mixture-of-experts layer, e.g. expert_site(3, 5) is "blocks.3.moe.experts.5.neurons"."""
    if kind not in EXPERT_SITE_KINDS:
        raise ValueError(f"unknown expert site kind {kind!r}; expected one of {', '.join(EXPERT_SITE_KINDS)}")
    return f"blocks.{layer}.moe.experts.{expert}.{kind}"


@dataclass
class _Target:
    module: nn.Module
    before: bool  # hook the module's input (True) or its output (False)
    shape: str  # "plain", "heads", "flat" (the module runs on [B*T, d]) or "expert" (one expert's routed tokens)
    layer: int | None
    expert: int | None = None
    which: str | None = None  # an expert site's kind: "neurons" or "out"
    router: bool = False


class Capture:
    """What a `read` saw in the last forward pass (`value`), detached unless asked for gradients."""

    def __init__(self, site_name: str) -> None:
        self.site = site_name
        self.value: torch.Tensor | None = None

    def __repr__(self) -> str:
        shape = None if self.value is None else tuple(self.value.shape)
        return f"Capture({self.site!r}, shape={shape})"


def _as_index(idx: Index, device: torch.device) -> torch.Tensor | slice:
    if idx is None:
        return slice(None)
    if isinstance(idx, slice):
        return idx
    if isinstance(idx, int):
        return torch.tensor([idx], device=device)
    if isinstance(idx, torch.Tensor):
        return idx.to(device=device, dtype=torch.long)
    return torch.tensor(list(idx), dtype=torch.long, device=device)


def select(x: torch.Tensor, rows: Index = None, positions: Index = None, units: Index = None, *, paired: bool = False) -> tuple:
    """An index tuple into a canonical [B, T, ...] tensor.

    `units` indexes the last axis (neurons, model dims) or, for per-head sites, the head axis.
    With `paired=True`, `rows` and `positions` are equal-length lists of (row, position) pairs.
    """
    r, p, u = (_as_index(i, x.device) for i in (rows, positions, units))
    unit_axis = 2 if x.dim() == 4 else x.dim() - 1
    if paired:
        if not isinstance(r, torch.Tensor) or not isinstance(p, torch.Tensor) or r.shape != p.shape:
            raise ValueError("paired indexing needs rows and positions of the same length")
        if isinstance(u, slice):
            return (r, p)
        return (r[:, None], p[:, None], u[None, :]) if unit_axis == 2 else (r[:, None], p[:, None], slice(None), u[None, :])
    parts: list[Any] = [r, p]
    if not isinstance(u, slice):
        while len(parts) < unit_axis:
            parts.append(slice(None))
        parts.append(u)
    tensor_axes = [i for i, part in enumerate(parts) if isinstance(part, torch.Tensor)]
    for k, axis in enumerate(tensor_axes):  # broadcast index tensors into an outer product
        shape = [1] * len(tensor_axes)
        shape[k] = -1
        parts[axis] = parts[axis].view(shape)
    return tuple(parts)


class Hooks:
    """A context manager that hooks one model's canonical sites for the forward passes inside it.

        with Hooks(model) as h:
            cap = h.read("blocks.3.mlp.neurons")
            h.replace("blocks.5.resid_post", clean, positions=[2, 3])
            logits = model.forward(**enc.inputs())
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._ops: dict[str, list[Edit]] = {}
        self._handles: list[Any] = []
        self._bt: dict[int, tuple[int, int]] = {}
        self._active = False

    def __enter__(self) -> Hooks:
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this context registered (also done on exit)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._ops.clear()
        self._active = False

    # ------------------------------------------------------------------ resolving
    def target(self, name: str) -> _Target:
        m = self.model
        if name == "embed":
            return _Target(m.embed_module, False, "plain", None)
        if name == "final_norm":
            if m.final_norm is None:
                raise ValueError(f"{m.architecture} has no final norm")
            return _Target(m.final_norm, False, "plain", None)
        match = _SITE.match(name)
        if not match:
            raise ValueError(f"unknown site {name!r}; sites are embed, final_norm, blocks.<layer>.<{'|'.join(SITE_KINDS)}> "
                             f"and, for mixture-of-experts layers, blocks.<layer>.<{'|'.join(MOE_SITE_KINDS)}> and "
                             f"blocks.<layer>.moe.experts.<expert>.<{'|'.join(EXPERT_SITE_KINDS)}>")
        layer, kind = int(match.group(1)), match.group(2)
        if not 0 <= layer < m.n_layers:
            raise ValueError(f"site {name!r}: layer {layer} is out of range (the model has {m.n_layers} layers)")
        moe_layer = layer in getattr(m, "moe_layers", ())
        if kind.startswith("moe."):
            return self._moe_target(name, layer, kind, match, moe_layer)
        if kind == "mlp.neurons" and moe_layer:
            raise ValueError(f"site {name!r}: layer {layer} is a mixture of experts, with no single MLP; its neurons are "
                             f"blocks.{layer}.moe.experts.<expert>.neurons")
        if kind == "resid_pre":
            return _Target(m.layers[layer], True, "plain", layer)
        if kind == "resid_post":
            return _Target(m.layers[layer], False, "plain", layer)
        if kind == "attn.out":
            return _Target(m.component(layer, "attn_out"), False, "plain", layer)
        if kind == "attn.heads":
            return _Target(m.component(layer, "attn_o"), True, "heads", layer)
        if kind == "mlp.out":
            return _Target(m.component(layer, "mlp_out"), False, "flat" if m.spec.flat_mlp else "plain", layer)
        return _Target(m.component(layer, "mlp_down"), True, "flat" if m.spec.flat_mlp else "plain", layer)

    def _moe_target(self, name: str, layer: int, kind: str, match: re.Match, moe_layer: bool) -> _Target:
        m = self.model
        if not moe_layer:
            what = "is a dense layer" if getattr(m, "moe_layers", ()) else "is not a mixture of experts"
            raise ValueError(f"site {name!r}: layer {layer} of {m.architecture} {what}")
        if kind == "moe.router":
            return _Target(m.component(layer, "moe_router"), False, "flat", layer, router=True)
        if kind.startswith("moe.shared"):
            key = "moe_shared" if kind == "moe.shared.out" else "moe_shared_down"
            try:
                module = m.component(layer, key)
            except ValueError:
                raise ValueError(f"site {name!r}: {m.architecture} has no shared expert in layer {layer}") from None
            return _Target(module, kind == "moe.shared.neurons", "flat", layer)
        expert = int(match.group(3))
        if not 0 <= expert < m.n_experts:
            raise ValueError(f"site {name!r}: expert {expert} is out of range (the model has {m.n_experts} experts)")
        return _Target(m.component(layer, "moe_experts"), False, "expert", layer, expert=expert, which=match.group(4))

    def _ensure(self, name: str) -> list[Edit]:
        if not self._active:
            raise RuntimeError("hooks can only be added inside `with Hooks(model) as h:`")
        if name in self._ops:
            return self._ops[name]
        tgt = self.target(name)
        ops: list[Edit] = []
        self._ops[name] = ops
        if tgt.shape in ("flat", "expert"):
            layer_module = self.model.layers[tgt.layer]

            def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs.get("hidden_states")
                self._bt[tgt.layer] = (hidden.shape[0], hidden.shape[1])

            self._handles.append(layer_module.register_forward_pre_hook(record, with_kwargs=True))

        def apply(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
            shape, changed = x.shape, False
            if tgt.shape == "heads":
                x = x.view(*shape[:-1], self.model.n_heads, shape[-1] // self.model.n_heads)
            elif tgt.shape == "flat" and x.dim() == 2:
                b, t = self._bt[tgt.layer]
                x = x.view(b, t, shape[-1])
            for op in ops:
                out = op(x)
                if out is not None:
                    x, changed = out, True
            return x.reshape(shape), changed

        def run(x: torch.Tensor) -> torch.Tensor:
            return apply(x)[0]

        if tgt.shape == "expert":
            self._handles.append(moe.install(tgt.module, self._expert_editor(tgt, ops)))
        elif tgt.router:
            def post_router(module: nn.Module, args: tuple, output: Any) -> Any:
                logits, changed = apply(output[0])
                if not changed:
                    return None
                weights, experts = moe.route(module, logits)
                return (logits, weights, experts, *output[3:])

            self._handles.append(tgt.module.register_forward_hook(post_router))
        elif tgt.before:
            def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
                if args:
                    return (run(args[0]), *args[1:]), kwargs
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                return args, {**kwargs, key: run(kwargs[key])}

            self._handles.append(tgt.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(module: nn.Module, args: tuple, output: Any) -> Any:
                if isinstance(output, torch.Tensor):
                    return run(output)
                if isinstance(output, tuple):
                    return (run(output[0]), *output[1:])
                first = output[0]
                output[0] = run(first)  # ModelOutput-like
                return output

            self._handles.append(tgt.module.register_forward_hook(post))
        return ops

    def _expert_editor(self, tgt: _Target, ops: list[Edit]) -> moe.Editor:
        """The call-out that shows one expert's routed tokens to `ops` as a [B, T, d] tensor (zero elsewhere)."""

        def editor(expert: int, which: str, token_index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            if expert != tgt.expert or which != tgt.which:
                return value
            b, t = self._bt[tgt.layer]
            x = value.new_zeros(b * t, value.shape[-1]).index_copy(0, token_index, value).view(b, t, -1)
            changed = False
            for op in ops:
                out = op(x)
                if out is not None:
                    x, changed = out, True
            return x.reshape(b * t, -1)[token_index] if changed else value

        return editor

    # ------------------------------------------------------------------ operations
    def edit(self, name: str, fn: Edit) -> None:
        """Run `fn` on the site's canonical tensor; its return value (if any) replaces the tensor."""
        self._ensure(name).append(fn)

    def read(self, name: str, *, grad: bool = False, positions: Index = None, rows: Index = None) -> Capture:
        """Record the site's value at each forward pass (kept in the graph when `grad`).

        Without `grad` the value is a copy, so in-place updates later in the forward (Falcon's
        `mlp_output += attention_output`) do not change it; with `grad` the model goes on with a
        copy instead, so the recorded tensor stays what the site produced.
        """
        cap = Capture(name)

        def fn(x: torch.Tensor) -> torch.Tensor | None:
            value = x[select(x, rows, positions)] if (positions is not None or rows is not None) else x
            if grad:
                cap.value = value
                return x.clone()
            cap.value = value.detach().clone()
            return None

        self.edit(name, fn)
        return cap

    def replace(self, name: str, value: torch.Tensor | float, *, rows: Index = None, positions: Index = None,
                units: Index = None, paired: bool = False) -> None:
        """Set the selected entries to `value` (broadcast against the selection)."""
        self.edit(name, _setter(value, rows, positions, units, paired, "set"))

    def add(self, name: str, delta: torch.Tensor | float, *, rows: Index = None, positions: Index = None,
            units: Index = None, paired: bool = False) -> None:
        """Add `delta` to the selected entries (e.g. noise, a steering vector)."""
        self.edit(name, _setter(delta, rows, positions, units, paired, "add"))

    def scale(self, name: str, factor: torch.Tensor | float, *, rows: Index = None, positions: Index = None,
              units: Index = None, paired: bool = False) -> None:
        """Multiply the selected entries by `factor` (amplify > 1, suppress < 1)."""
        self.edit(name, _setter(factor, rows, positions, units, paired, "mul"))

    def ablate(self, name: str, *, rows: Index = None, positions: Index = None, units: Index = None,
               value: torch.Tensor | float = 0.0) -> None:
        """Zero the selected entries (or set them to `value`, e.g. a mean activation)."""
        self.replace(name, value, rows=rows, positions=positions, units=units)


def _setter(value: Any, rows: Index, positions: Index, units: Index, paired: bool, how: str) -> Edit:
    def fn(x: torch.Tensor) -> torch.Tensor:
        idx = select(x, rows, positions, units, paired=paired)
        v = value.to(device=x.device, dtype=x.dtype) if isinstance(value, torch.Tensor) else value
        # computed from the untouched input, so autograd's saved tensors are not changed in place
        new = v if how == "set" else x[idx] + v if how == "add" else x[idx] * v
        x = x.clone()
        x[idx] = new
        return x

    return fn
