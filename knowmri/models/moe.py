"""Mixture-of-experts layers: the routed experts' forward with per-expert edits, and re-routing.

transformers stores a layer's experts fused (`gate_up_proj` [E, 2 d_expert, d_model], `down_proj`
[E, d_model, d_expert], as in Mixtral, Qwen2/3-MoE, OLMoE) and computes them in one module, so an
expert has no module of its own to hook. While a `Hooks` context edits or reads an expert's site,
`install` replaces that module's forward by `routed_forward`: the same computation as transformers'
eager loop (each expert runs on the tokens routed to it, and only on those), with a call-out per
expert that may read or change its hidden units (`neurons`) and its weighted output (`out`). Nothing
else changes: the router, the shared expert and every other layer keep transformers' own code.

`route` re-runs a router's own selection on edited router logits, so forcing or dropping an expert
through the `moe.router` site changes which experts run, with each family's exact rule (softmax or
sigmoid, grouped top-k, renormalisation, scaling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: editor(expert, which, token_index, value) -> value: `which` is "neurons" ([n, d_expert], after the
#: non-linearity, what the down projection reads) or "out" ([n, d_model], weighted by the routing weight);
#: `token_index` [n] are the flat (batch * position) indices of the tokens routed to the expert.
Editor = Callable[[int, str, torch.Tensor, torch.Tensor], torch.Tensor]

_EDITORS = "_knowmri_expert_editors"
_FORWARD = "_knowmri_previous_forward"  # an instance-level forward found at install (e.g. Accelerate's hook)


def check_experts(module: nn.Module, where: str) -> None:
    """Raise ValueError unless `module` stores its experts in the fused layout `routed_forward` computes."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"{where}: the experts are not stored as gate_up_proj [E, 2 d_expert, d_model] and down_proj "
                         f"[E, d_model, d_expert]; knowmri supports that layout only")
    odd = [flag for flag, want in (("has_bias", False), ("is_transposed", False), ("is_concatenated", True),
                                   ("has_gate", True)) if getattr(module, flag, want) != want]
    if odd or gate_up.shape[1] != 2 * down.shape[2]:
        raise ValueError(f"{where}: unsupported experts layout ({', '.join(odd) or 'gate_up_proj width'})")


def n_experts(module: nn.Module) -> int:
    return int(module.gate_up_proj.shape[0])


def d_expert(module: nn.Module) -> int:
    return int(module.down_proj.shape[2])


def value_vectors(module: nn.Module, expert: int) -> torch.Tensor:
    """[d_expert, d_model]: what each of an expert's neurons writes (its down projection's columns)."""
    return module.down_proj[expert].T


def key_vectors(module: nn.Module, expert: int) -> torch.Tensor:
    """[d_expert, d_model]: what each of an expert's neurons reads through its up projection."""
    return module.gate_up_proj[expert, d_expert(module):]


def routed_forward(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output [N, d_model] for flat hidden states [N, d_model], running each expert on its routed
    tokens only and passing its neurons and output through the installed editors (see `install`)."""
    editors: list[Editor] = module.__dict__.get(_EDITORS, [])
    if module.gate_up_proj.device.type == "meta":
        raise ValueError("the experts' weights are offloaded (on the meta device): expert sites need them in memory")
    out = torch.zeros_like(hidden)
    count = n_experts(module)
    for expert in range(count):
        token_index, top_k_pos = torch.where(top_k_index == expert)
        gate, up = nn.functional.linear(hidden[token_index], module.gate_up_proj[expert]).chunk(2, dim=-1)
        units = module.act_fn(gate) * up
        for editor in editors:
            units = editor(expert, "neurons", token_index, units)
        part = nn.functional.linear(units, module.down_proj[expert])
        part = part * top_k_weights[token_index, top_k_pos, None]
        for editor in editors:
            part = editor(expert, "out", token_index, part)
        out.index_add_(0, token_index, part.to(out.dtype))
    return out


class _Installed:
    """A handle that takes one editor off an experts module (and restores its forward after the last)."""

    def __init__(self, module: nn.Module, editor: Editor) -> None:
        self.module, self.editor = module, editor

    def remove(self) -> None:
        editors = self.module.__dict__.get(_EDITORS)
        if editors is None or self.editor not in editors:
            return
        editors.remove(self.editor)
        if not editors:
            del self.module.__dict__[_EDITORS]
            previous = self.module.__dict__.pop(_FORWARD, None)
            if previous is None:
                self.module.__dict__.pop("forward", None)
            else:
                self.module.__dict__["forward"] = previous


def _routed(module: nn.Module) -> Callable[..., torch.Tensor]:
    """`routed_forward` as the module's forward, through Accelerate's hook where the module has one (as its own
    hooked forward does: the hook moves the inputs and loads offloaded weights before, and the output after)."""
    hook = getattr(module, "_hf_hook", None)

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        if hook is not None:
            args, kwargs = hook.pre_forward(module, *args, **kwargs)
        out = routed_forward(module, *args, **kwargs)
        return hook.post_forward(module, out) if hook is not None else out

    return forward


def install(module: nn.Module, editor: Editor) -> _Installed:
    """Route `module`'s forward through `routed_forward` with `editor` until the handle's `remove()`."""
    editors = module.__dict__.setdefault(_EDITORS, [])
    if not editors:
        if "forward" in module.__dict__:
            module.__dict__[_FORWARD] = module.__dict__["forward"]
        module.__dict__["forward"] = _routed(module)
    editors.append(editor)
    return _Installed(module, editor)


class _Replay:
    """A router seen through an identity projection: its forward on logits returns the logits' own routing."""

    def __init__(self, router: nn.Module, logits: torch.Tensor) -> None:
        n = logits.shape[-1]
        self._router = router
        self.weight = torch.eye(n, dtype=logits.dtype, device=logits.device)
        self.hidden_dim = n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._router, name)


def route(router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts), each [N, experts_per_token]: the router's own choice for router logits [N, E].

    The router's forward runs on the logits through an identity projection, so the selection is the
    family's exact rule. Infinite logits (an expert dropped with -inf) are clamped to the dtype's range."""
    finite = torch.nan_to_num(logits, nan=0.0, posinf=torch.finfo(logits.dtype).max / 4,
                              neginf=torch.finfo(logits.dtype).min / 4)
    replay = _Replay(router, finite)
    _, weights, experts = type(router).forward(replay, finite)  # type: ignore[arg-type]
    return weights, experts
