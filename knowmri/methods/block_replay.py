"""Block replay: run a model's own decoder blocks directly, from a recorded residual stream, at any batch size.

Engines that re-run the model from some block on (causal tracing's restorations, the knowledge-neuron
IG rows that start at their own layer) share this. `record_calls` records the arguments the model
itself passed each block (attention masks, rotary embeddings, ALiBi, positions, caches) in a forward;
`BlockRunner` calls the blocks with those arguments, expanded to any batch size (the batch axis found
by comparing a recording at batch 1 with one at batch n), and reads out one position's logits. It
checks itself against a full forward and falls back to full forwards (with the block input replaced)
when the check fails. `hidden_of` is the residual stream a recorded call received;
`mlp_at_one_position` makes a block's MLP compute one position only (for the last block, when only
one position is read out).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from knowmri.hooks import Hooks, site


@contextmanager
def record_calls(model: Any, skip: bool = False) -> Iterator[list[tuple[tuple, dict]]]:
    """Record each block's call (positional args, keyword args) during the forwards inside.

    With `skip`, blocks after the first are not computed (each passes its input on, in the first
    block's output structure): only their arguments are wanted, and these do not depend on the
    states. The forwards' outputs are then meaningless."""
    calls: list[tuple[tuple, dict]] = [((), {})] * model.n_layers
    first: list[Any] = []
    handles = []
    for i, layer in enumerate(model.layers):
        def pre(module: Any, args: tuple, kwargs: dict, i: int = i) -> None:
            if args:
                args = (args[0].clone(), *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].clone()}
            calls[i] = (args, dict(kwargs))
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    if skip:
        handles.append(model.layers[0].register_forward_hook(lambda module, args, out: first.append(out)))

        def passed_on(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            out = first[-1]
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        for layer in list(model.layers)[1:]:
            layer.forward = passed_on
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
        if skip:
            for layer in list(model.layers)[1:]:
                del layer.forward


@contextmanager
def mlp_at_one_position(model: Any, layer: int, position: int) -> Iterator[None]:
    """Block `layer`'s MLP computes only `position` (its output elsewhere is zero) inside the context.

    For the last block when only one position is read out: the other positions' MLP outputs feed
    nothing, and the MLP is most of a block's arithmetic. A no-op for MLPs that run on flattened
    tokens (`flat_mlp`) or when a component is missing.
    """
    try:
        inputs = [model.component(layer, key) for key in ("mlp_in", "mlp_gate") if getattr(model.spec, key)]
        down = model.component(layer, "mlp_down")
    except ValueError:
        inputs, down = [], None
    if model.spec.flat_mlp or down is None or not inputs:
        yield
        return
    length: list[int] = []

    def pre(module: Any, args: tuple) -> tuple | None:
        x = args[0]
        if x.dim() != 3 or x.shape[1] == 1:
            return None
        length[:] = [x.shape[1]]
        return (x.narrow(1, position % x.shape[1], 1), *args[1:])

    def post(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not length or out.dim() != 3 or out.shape[1] != 1:
            return None
        full = out.new_zeros(out.shape[0], length[0], out.shape[2])
        full[:, position % length[0]] = out[:, 0]
        return full

    handles = [m.register_forward_pre_hook(pre) for m in inputs] + [down.register_forward_hook(post, prepend=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden_of(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _expand(one: Any, many: Any, n: int, batch: int, memo: dict | None = None) -> Any:
    """`one` (recorded at batch 1) for `batch` rows, its batch axis found by comparing with `many` (batch n).

    `memo` shares one expanded copy among the blocks that were passed the same tensor (rotary tables, masks)."""
    if isinstance(one, torch.Tensor):
        if not isinstance(many, torch.Tensor):
            raise ValueError("block arguments differ between batch sizes")
        if one.shape == many.shape:
            return one
        if one.dim() and one.shape[0] * n == many.shape[0] and one.shape[1:] == many.shape[1:]:
            if memo is None:
                return one.repeat(batch, *[1] * (one.dim() - 1))
            key = (id(one), batch)
            if key not in memo:
                memo[key] = (one, one.repeat(batch, *[1] * (one.dim() - 1)))  # `one` kept: its id stays unique
            return memo[key][1]
        raise ValueError(f"cannot find the batch axis of a block argument of shape {tuple(one.shape)}")
    if isinstance(one, (tuple, list)):
        if not isinstance(many, (tuple, list)) or len(one) != len(many):
            raise ValueError("block arguments differ between batch sizes")
        return type(one)(_expand(a, b, n, batch, memo) for a, b in zip(one, many))
    if isinstance(one, dict):
        if not isinstance(many, dict) or one.keys() != many.keys():
            raise ValueError("block arguments differ between batch sizes")
        return {k: _expand(v, many[k], n, batch, memo) for k, v in one.items()}
    return one


class BlockRunner:
    """Runs blocks `start..L-1` from a given residual stream and reads out one position's logits."""

    def __init__(self, model: Any, calls_one: list, calls_many: list, n_many: int, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> None:
        self.model = model
        self.calls_one, self.calls_many, self.n_many = calls_one, calls_many, n_many
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.direct = True
        self._cache: dict[tuple[int, int], tuple[tuple, dict, bool]] = {}
        self._memo: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def block_args(self, layer: int, batch: int) -> tuple[tuple, dict, bool]:
        """The block's recorded arguments for `batch` rows, and whether it takes `hidden_states` by name."""
        key = (layer, batch)
        if key not in self._cache:
            if any(b != batch for _, b in self._cache):
                self._cache.clear()  # one batch size at a time (a staircase changes it at every block)
                self._memo.clear()
            (a1, k1), (an, kn) = self.calls_one[layer], self.calls_many[layer]
            args = _expand(tuple(a1[1:]), tuple(an[1:]), self.n_many, batch, self._memo)
            drop = {"hidden_states"} if not a1 else set()
            kwargs = _expand({k: v for k, v in k1.items() if k not in drop},
                             {k: v for k, v in kn.items() if k not in drop}, self.n_many, batch, self._memo)
            self._cache[key] = (args, kwargs, not a1)
        return self._cache[key]

    def run(self, start: int, hidden: torch.Tensor, position: int, hooks: Hooks | None = None) -> torch.Tensor:
        """Logits [B, vocab] at `position` after blocks start..L-1 read `hidden` [B, T, d] (the input of `start`)."""
        if not self.direct:
            return self._run_full(start, hidden, position, hooks)
        last = self.model.n_layers - 1
        for layer in range(start, self.model.n_layers):
            args, kwargs, by_name = self.block_args(layer, hidden.shape[0])
            with mlp_at_one_position(self.model, layer, position) if layer == last else nullcontext():
                if by_name:
                    out = self.model.layers[layer](**kwargs, hidden_states=hidden)
                else:
                    out = self.model.layers[layer](hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        return self.model.readout(hidden[:, position])

    def _run_full(self, start: int, hidden: torch.Tensor, position: int, hooks: Hooks | None) -> torch.Tensor:
        """The fallback: a whole forward whose residual stream at `start` is replaced by `hidden`."""
        L = self.model.n_layers
        batch = hidden.shape[0]
        with Hooks(self.model) if hooks is None else nullcontext(hooks) as h:
            h.replace(site(start, "resid_pre") if start < L else site(L - 1, "resid_post"), hidden)
            logits = self.model.forward(input_ids=self.input_ids.repeat(batch, 1),
                                        attention_mask=self.attention_mask.repeat(batch, 1))
        return logits[:, position]

    def check(self, start_hidden: torch.Tensor, position: int, expected: torch.Tensor) -> None:
        """Use direct block calls only if they reproduce the model's own logits `expected` [B, vocab]."""
        try:
            got = self.run(0, start_hidden, position)
            ok = torch.allclose(got.float().softmax(-1).cpu(), expected.float().softmax(-1).cpu(), atol=1e-3)
        except (ValueError, TypeError, RuntimeError, IndexError, KeyError):
            ok = False
        self.direct = bool(ok)
