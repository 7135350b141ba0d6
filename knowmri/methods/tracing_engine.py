"""The causal-tracing engine (Meng et al. 2022, ROME), batched and with prefix reuse; `causal_tracing` runs it.

ROME's `trace_with_patch` runs one forward per (token, layer) cell: a clean row and noised
rows, copying the clean state into the noised rows at that cell. This engine computes the
same grid with far less work:

- the clean run happens once, capturing every state that may be restored;
- the noise is drawn once (fixed seed) and shared by every cell, as in ROME;
- the corrupted run happens once, capturing the residual stream entering every block, so a
  restoration that starts at block `l` only re-runs blocks `l..L-1` (`block_replay.BlockRunner`);
- all tokens of a layer go in one batch (row i restores token t_i), and only the predicting
  position is read out;
- on a causal model, restoring a token before the subject is a no-op (its states are the same
  in the clean and the corrupted run), so those cells are the corrupted probability;
- on a causal model, a restoration at token t re-runs only positions t..T-1 (`SuffixRunner`),
  and the last block's MLP runs at the read-out position only (`mlp_at_one_position`).

Every cell keeps its P(answer) per noise sample beside the mean (`TraceResult.samples`), so the
method reports a standard error at no extra cost.

Public for the method's estimate: `suffix_pays` (which engine `trace` picks), `restore_starts` and
`staircase_cost` (the blocks a restoration re-runs), `window_layers` and `auto_window`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from knowmri.hooks import Hooks, site
from knowmri.methods.block_replay import BlockRunner, hidden_of, mlp_at_one_position, record_calls
from knowmri.models.attention import short_attention
from knowmri.sample import Span

KIND_SITES = {"hidden": "resid_post", "mlp": "mlp.out", "attn": "attn.out"}


def subject_noise(model: Any, samples: int, n_tokens: int, scale: float, seed: int) -> torch.Tensor:
    """[samples, n_tokens, d_model] Gaussian noise of std `scale`, the same for every cell (fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, model.d_model, generator=gen) * scale


class SuffixRunner:
    """Runs blocks over the positions `t..T-1` only, for causal models: a restoration at token `t` cannot
    change the states before `t`, so those come from the corrupted run's keys and values (its cache).

    The block arguments (masks, rotary embeddings, cache positions) are recorded from the model's own
    forward over the suffix with a prefix cache, and each block call gets a fresh cache layer holding the
    corrupted prefix for its rows. `check` compares it with the corrupted run; callers fall back to the
    full-length `BlockRunner` when it does not reproduce it.
    """

    def __init__(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, t: int, cache: Any,
                 S: int, skip: bool = True) -> None:
        self.model, self.t, self.S = model, t, S
        self.prefix = [_prefix_layer(layer, t, S) for layer in cache.layers[:model.n_layers]]
        self.template = cache
        recorded = []
        for b in (1, 2):
            with record_calls(model, skip=skip) as calls:
                model.run(input_ids=input_ids[:, t:].repeat(b, 1), attention_mask=attention_mask.repeat(b, 1),
                          cache=self._cache(None, b), keep=1)
            recorded.append(list(calls))
        self.blocks = BlockRunner(model, recorded[0], recorded[1], 2, input_ids, attention_mask)
        args, kwargs = recorded[0][0]
        self.cache_at: int | str = next((k for k, v in kwargs.items() if isinstance(v, Cache)), "")
        if not self.cache_at:
            where = [i for i, v in enumerate(args[1:]) if isinstance(v, Cache)]
            if len(where) != 1:
                raise ValueError("cannot find the cache among the block arguments")
            self.cache_at = where[0]

    def _cache(self, layer: int | None, rows: int) -> Any:
        """A cache whose layer `layer` (every layer when None) holds the corrupted prefix for `rows` rows."""
        cache = copy.copy(self.template)
        cache.layers = list(cache.layers)
        for j in range(self.model.n_layers) if layer is None else (layer,):
            cache.layers[j] = _rows_of(self.prefix[j], rows)
        return cache

    def block(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block `layer` over the suffix states `hidden` [B, T - t, d] (row i uses noise sample i % S)."""
        args, kwargs, by_name = self.blocks.block_args(layer, hidden.shape[0])
        cache = self._cache(layer, hidden.shape[0])
        if isinstance(self.cache_at, str):
            kwargs = {**kwargs, self.cache_at: cache}
        else:
            args = (*args[:self.cache_at], cache, *args[self.cache_at + 1:])
        if by_name:
            out = self.model.layers[layer](**kwargs, hidden_states=hidden)
        else:
            out = self.model.layers[layer](hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def check(self, suffix_input: torch.Tensor, expected: torch.Tensor) -> bool:
        """Whether blocks 0..L-1 over the corrupted suffix [S, T - t, d] reproduce the corrupted logits."""
        try:
            hidden = suffix_input
            for layer in range(self.model.n_layers):
                hidden = self.block(layer, hidden)
            got = self.model.readout(hidden[:, -1])
            return torch.allclose(got.float().softmax(-1).cpu(), expected.float().softmax(-1).cpu(), atol=1e-3)
        except (ValueError, TypeError, RuntimeError, IndexError, KeyError, AttributeError):
            return False


def _prefix_layer(layer: Any, t: int, S: int) -> Any:
    """A copy of a cache layer cut to the first `t` positions and `S` rows (only layers that keep every token)."""
    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) or not getattr(layer, "is_initialized", False):
        raise ValueError(f"cannot cut a {type(layer).__name__} cache layer")
    if isinstance(layer, DynamicSlidingWindowLayer) and layer.cumulative_length >= layer.sliding_window - 1:
        raise ValueError("the prompt fills the sliding window")
    out = copy.copy(layer)
    out.keys, out.values = layer.keys[:S, :, :t], layer.values[:S, :, :t]
    if isinstance(layer, DynamicSlidingWindowLayer):
        out.cumulative_length = t
    return out


def _rows_of(layer: Any, rows: int) -> Any:
    """A copy of a prefix cache layer for `rows` rows, row i holding noise sample i % S."""
    out = copy.copy(layer)
    n = -(-rows // layer.keys.shape[0])
    out.keys, out.values = layer.keys.repeat(n, 1, 1, 1)[:rows], layer.values.repeat(n, 1, 1, 1)[:rows]
    return out


def _prob(logits: torch.Tensor, answer: int) -> torch.Tensor:
    """P(answer) per row of [B, vocab] logits (one reduction instead of a whole softmax)."""
    logits = logits.float()
    return (logits[:, answer] - logits.logsumexp(-1)).exp()


@dataclass
class TraceResult:
    """The grids [tokens, layers] of P(answer) per restored kind (the mean over noise samples), the clean
    and corrupted P, and the same per noise sample: `samples` [tokens, layers, S] per kind, `low_samples` [S]."""

    high: float
    low: float
    grids: dict[str, torch.Tensor]
    engine: str
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    low_samples: torch.Tensor | None = None


def auto_window(n_layers: int) -> int:
    """ROME's window scaled to depth: 10 of GPT-2 XL's 48 layers, i.e. round(L x 10 / 48), at least 1."""
    return max(1, round(n_layers * 10 / 48))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's window of layers restored around `layer` for MLP / attention (centred like ROME);
    a `window` of 0 or less is `auto_window(n_layers)`."""
    if window <= 0:
        window = auto_window(n_layers)
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def trace(model: Any, input_ids: torch.Tensor, position: int, answer: int, subject: Span, noise: torch.Tensor,
          kinds: list[str], window: int, batch_size: int,
          progress: Callable[[float, str], None] | None = None, suffix: bool | None = None) -> TraceResult:
    """ROME's causal-tracing grids for `kinds` (hidden, mlp, attn); `noise` [S, len(subject), d_model].

    With `suffix` (causal models), a restoration at token t re-runs only positions t..T-1; otherwise, or
    when that does not reproduce the model, whole sequences from the restored block on. None chooses
    by cost: the suffix engine makes more, smaller block calls, which only pays on real-sized models.
    The replays' many small attention calls run as batched matmuls (`short_attention`).
    """
    with short_attention(model):
        return _trace(model, input_ids, position, answer, subject, noise, kinds, window, batch_size, progress, suffix)


def _trace(model: Any, input_ids: torch.Tensor, position: int, answer: int, subject: Span, noise: torch.Tensor,
           kinds: list[str], window: int, batch_size: int, progress: Callable[[float, str], None] | None,
           suffix: bool | None) -> TraceResult:
    L, T, S = model.n_layers, input_ids.shape[1], noise.shape[0]
    mask = torch.ones_like(input_ids)
    subj = list(subject)
    needed = {KIND_SITES[k] for k in kinds}
    with Hooks(model) as h, record_calls(model) as calls_one:
        caps = {(kind, layer): h.read(site(layer, kind)) for kind in needed for layer in range(L)}
        logits = model.forward(input_ids=input_ids, attention_mask=mask)
    high = float(logits[0, position].float().softmax(-1)[answer])
    clean = {kind: [caps[(KIND_SITES[kind], layer)].value[0] for layer in range(L)] for kind in kinds}
    calls_one = list(calls_one)

    n_run = max(S, 2)  # two batch sizes reveal each block argument's batch axis
    noise_run = noise if S > 1 else noise.expand(2, -1, -1)
    if suffix is None:
        suffix = suffix_pays(model, T, subject.start, S, kinds, window)
    suffix = suffix and model.kind == "causal" and position == T - 1
    with Hooks(model) as h, record_calls(model) as calls_many:
        h.add("embed", noise_run, positions=subj)
        last = h.read(site(L - 1, "resid_post"))
        mlp_caps = [h.read(site(layer, "mlp.out")) for layer in range(L)] if suffix and "mlp" in kinds else []
        out = model.run(input_ids=input_ids.repeat(n_run, 1), attention_mask=mask.repeat(n_run, 1), use_cache=suffix)
    cache = model.output_cache(out) if suffix else None
    corrupt_logits = out.logits[:S, position]
    low_samples = _prob(corrupt_logits, answer).cpu()
    low = float(low_samples.mean())
    corrupt = [hidden_of(calls_many[layer])[:S] for layer in range(L)] + [last.value[:S]]
    runner = BlockRunner(model, calls_one, list(calls_many), n_run, input_ids, mask)
    runner.check(corrupt[0], position, corrupt_logits)

    cells = [t for t in range(T) if model.kind != "causal" or t >= subject.start]
    per_batch = max(1, batch_size // S)
    grids = {kind: torch.full((T, L), low) for kind in kinds}
    samples = {kind: low_samples.expand(T, L, S).clone() for kind in kinds}  # cells left as is: the corrupted run
    suffixes = _suffix_runners(model, input_ids, mask, cells, cache, S, corrupt[0], corrupt_logits) \
        if runner.direct and isinstance(cache, Cache) else None
    if suffixes is not None:
        corrupt_mlp = [c.value[:S] for c in mlp_caps]
        skip_first = corrupt_mlp if corrupt_mlp and _first_block_shortcut(
            model, suffixes[cells[0]], cells[0], clean["mlp"], corrupt, corrupt_mlp) else None
        done, total = 0, len(kinds) * len(cells)
        readouts = _Readouts(model, answer, S)
        for kind in kinds:
            starts = restore_starts(kind, window, L)
            for t in cells:
                rows = max(1, batch_size * T // ((T - t) * S))  # the same tokens per forward as whole sequences
                for i in range(0, L, rows):
                    layers = list(range(i, min(L, i + rows)))
                    final, groups = _restore_suffix(model, suffixes[t], kind, t, layers, starts, clean, corrupt,
                                                    window, S, skip_first if kind == "mlp" else None)
                    readouts.add(grids[kind][t], samples[kind][t], layers, groups, final)
                done += 1
                if progress is not None:
                    progress(done / total, f"{kind} token {t}")
        readouts.flush()
        return TraceResult(high, low, grids, "suffix block replay", samples, low_samples)
    done, total = 0, len(kinds) * L
    for kind in kinds:
        starts = restore_starts(kind, window, L)
        for layer in range(L):
            start = starts[layer]
            for i in range(0, len(cells), per_batch):
                chunk = cells[i:i + per_batch]
                probs = _restore(model, runner, kind, layer, start, chunk, clean, corrupt, position, answer,
                                 window, S)
                grids[kind][chunk, layer] = probs.mean(1)
                samples[kind][chunk, layer] = probs
            done += 1
            if progress is not None:
                progress(done / total, f"{kind} layer {layer}")
    return TraceResult(high, low, grids, "block replay" if runner.direct else "full forwards", samples, low_samples)


#: Rough costs for choosing an engine: a block call's fixed cost (Python, HF's layer code) and a
#: matmul rate, both of a modest CPU; only their ratio to the arithmetic matters.
_CALL_SECONDS, _FLOPS_PER_SECOND = 4e-4, 1e11


def suffix_pays(model: Any, T: int, first: int, S: int, kinds: list[str], window: int) -> bool:
    """Whether re-running only suffixes saves more arithmetic than its extra block calls cost."""
    L = model.n_layers
    block = 2 * sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 2)
    starts = sum(L - start for kind in kinds for start in restore_starts(kind, window, L))
    saved = S * starts * sum(range(first, T)) * block / _FLOPS_PER_SECOND  # positions < t no longer re-run
    extra = (T - first) * L * (len(kinds) + 3) * _CALL_SECONDS  # a staircase per (kind, t), recording and check
    return saved > extra


def _suffix_runners(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, cells: list[int], cache: Any, S: int,
                    embedded: torch.Tensor, corrupt_logits: torch.Tensor) -> dict[int, SuffixRunner] | None:
    """A checked `SuffixRunner` per restored token, or None when one does not reproduce the corrupted run."""
    runners = {}
    for t in cells:
        for skip in (True, False):  # recording without computing the blocks, else with
            try:
                runner = SuffixRunner(model, input_ids, mask, t, cache, S, skip=skip)
            except (ValueError, TypeError, RuntimeError, IndexError, KeyError, AttributeError):
                continue
            if runner.check(embedded[:1, t:], corrupt_logits[:1]):  # one noise sample is enough to check
                runners[t] = runner
                break
        if t not in runners:
            return None
    return runners


def restore_starts(kind: str, window: int, n_layers: int) -> list[int]:
    """The first block each layer's restoration changes: l + 1 for a hidden state, else its window's start."""
    return [layer + 1 if kind == "hidden" else window_layers(layer, window, n_layers).start for layer in range(n_layers)]


@dataclass
class _Step:
    """One block of a staircase: the groups (of S rows) that split, join and run there."""

    block: int
    source: list[int] | None  # each group after the split: the group whose rows it copies (None: no split)
    joined: list[list[int]]  # groups that join at this block (members: indices into the staircase's layers)
    groups: list[list[int]]  # every group after the split and the join, in row order
    restored: list[bool]  # per group: whether this block's output is restored (its members agree)


def _staircase(kind: str, layers: list[int], starts: list[int], window: int, n_layers: int,
               skip_first: bool) -> list[_Step]:
    """The staircase of restorations (t, l), l in `layers`: rows join at their start block (until then they
    equal the corrupted run), restorations whose states are still equal share a group of rows (ROME's windows
    at the first layers all start at block 0 and restore the same blocks until the shortest one ends, where
    the group splits), and with `skip_first` an MLP window joins after its first block."""
    windows = [set() if kind == "hidden" else set(window_layers(layer, window, n_layers)) for layer in layers]
    joins = [starts[layer] + skip_first for layer in layers]
    groups: list[list[int]] = []
    steps = []
    for j in range(min(joins), n_layers + 1):
        source = None
        if groups and j < n_layers:  # split the groups whose members stop agreeing at block j
            split = [(g, part) for g, members in enumerate(groups) for flag in (True, False)
                     if (part := [i for i in members if (j in windows[i]) == flag])]
            if len(split) != len(groups):
                source, groups = [g for g, _ in split], [part for _, part in split]
        new = [i for i in range(len(layers)) if joins[i] == j]
        joined = []
        for flag in (True, False):
            members = [i for i in new if (j in windows[i]) == flag]
            if members:
                joined += [[i] for i in members] if kind == "hidden" else [members]
        groups = groups + joined
        steps.append(_Step(j, source, joined, groups, [j in windows[members[0]] for members in groups]))
    return steps


def staircase_cost(kind: str, layers: list[int], starts: list[int], window: int, n_layers: int,
                   skip_first: bool) -> tuple[int, int]:
    """(group block calls, groups read out) of a staircase, in units of S rows: what `_restore_suffix` runs."""
    steps = _staircase(kind, layers, starts, window, n_layers, skip_first)
    return sum(len(step.groups) for step in steps if step.block < n_layers), len(steps[-1].groups)


class _Readouts:
    """Final states waiting to be read out together, written into their grid rows on `flush`.

    A staircase ends with S rows per group, often a few dozen rows: the unembedding of so few rows
    is bound by reading its [vocab, d] matrix, several times slower per row than a few hundred rows
    at once, so the rows of consecutive staircases share one matmul (each row's logits are the same)."""

    ROWS = 768

    def __init__(self, model: Any, answer: int, S: int) -> None:
        self.model, self.answer, self.S = model, answer, S
        self.pending: list[tuple[torch.Tensor, torch.Tensor, list[int], list[list[int]], torch.Tensor]] = []
        self.rows = 0

    def add(self, row: torch.Tensor, per_sample: torch.Tensor, layers: list[int], groups: list[list[int]],
            final: torch.Tensor) -> None:
        """Queue `final` [len(groups) x S, d]; group g's mean P(answer) goes to `row[layers[m]]`, m in groups[g],
        and its S values to `per_sample[layers[m]]`."""
        if self.rows + final.shape[0] > self.ROWS:
            self.flush()
        self.pending.append((row, per_sample, layers, groups, final))
        self.rows += final.shape[0]

    def flush(self) -> None:
        if not self.pending:
            return
        finals = torch.cat([p[4] for p in self.pending])
        each = self.model.readout_logprob(finals, self.answer).exp().view(-1, self.S).cpu()
        probs = each.mean(1)
        g = 0
        for row, per_sample, layers, groups, _ in self.pending:
            for members in groups:
                index = [layers[m] for m in members]
                row[index] = probs[g]
                per_sample[index] = each[g]
                g += 1
        self.pending, self.rows = [], 0


def _restore_suffix(model: Any, runner: SuffixRunner, kind: str, t: int, layers: list[int], starts: list[int],
                    clean: dict[str, list[torch.Tensor]], corrupt: list[torch.Tensor], window: int, S: int,
                    skip_first: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[list[int]]]:
    """The final states at the read-out position [groups x S, d] and the groups (members: indices into
    `layers`) for restoring (t, l), l in `layers`, in one staircase batch (`_staircase`): each block runs
    once over the groups of rows that need it, row (group, sample s).

    With `skip_first` (mlp, the corrupted MLP outputs per layer [S, T, d]), a window's first block is not
    run: it changes only position t, by the clean minus the corrupted MLP output there.
    """
    L = model.n_layers
    hidden = None
    for step in _staircase(kind, layers, starts, window, L, skip_first is not None):
        j = step.block
        if step.source is not None:
            index = torch.tensor([g * S + s for g in step.source for s in range(S)], device=hidden.device)
            hidden = hidden.index_select(0, index)
        for members in step.joined:
            block = corrupt[j][:, t:].clone()
            if kind == "hidden":
                block[:, 0] = clean["hidden"][layers[members[0]]][t].to(block.device)
            elif skip_first is not None:
                block[:, 0] += clean[kind][j - 1][t].to(block.device) - skip_first[j - 1][:, t].to(block.device)
            hidden = block if hidden is None else torch.cat([hidden, block.to(hidden.device)])
        if j < L:
            rows = [g * S + s for g, restored in enumerate(step.restored) if restored for s in range(S)]
            with Hooks(model) as h:
                if rows:
                    value = clean[kind][j][t]
                    h.replace(site(j, KIND_SITES[kind]), value.expand(len(rows), -1), rows=rows,
                              positions=[0] * len(rows), paired=True)
                with mlp_at_one_position(model, j, -1) if j == L - 1 else nullcontext():
                    hidden = runner.block(j, hidden)
    return hidden[:, -1], step.groups


def _first_block_shortcut(model: Any, runner: SuffixRunner, t: int, clean: list[torch.Tensor],
                          corrupt: list[torch.Tensor], corrupt_mlp: list[torch.Tensor]) -> bool:
    """Whether block 0's output with its MLP output at t restored equals the corrupted block output plus
    (clean - corrupted) MLP output at t: true where the MLP output is added to the residual stream as is."""
    try:
        with Hooks(model) as h:
            h.replace(site(0, "mlp.out"), clean[0][t], positions=[0])
            with mlp_at_one_position(model, 0, -1) if model.n_layers == 1 else nullcontext():
                ran = runner.block(0, corrupt[0][:, t:])
    except (ValueError, TypeError, RuntimeError, IndexError, KeyError, AttributeError):
        return False
    formula = corrupt[1][:, t:].clone()
    formula[:, 0] += clean[0][t].to(formula.device) - corrupt_mlp[0][:, t].to(formula.device)
    if model.n_layers == 1:
        ran, formula = ran[:, -1], formula[:, -1]
    tol = 1e-4 if ran.dtype == torch.float32 else 2e-2
    scale = float(formula.float().abs().max()) or 1.0
    return float((ran.float() - formula.float()).abs().max()) <= tol * scale


def _restore(model: Any, runner: BlockRunner, kind: str, layer: int, start: int, chunk: list[int],
             clean: dict[str, list[torch.Tensor]], corrupt: list[torch.Tensor], position: int, answer: int,
             window: int, S: int) -> torch.Tensor:
    """P(answer) per noise sample [len(chunk), S], one row per token in `chunk`, restoring (token, layer)."""
    n = len(chunk)
    hidden = corrupt[start].repeat(n, 1, 1)
    rows = torch.arange(n * S, device=hidden.device)
    tokens = torch.tensor(chunk, device=hidden.device).repeat_interleave(S)
    with Hooks(model) as h:
        if kind == "hidden":
            hidden[rows, tokens] = clean["hidden"][layer].to(hidden.device)[tokens]
        else:
            for j in window_layers(layer, window, model.n_layers):
                value = clean[kind][j]
                h.replace(site(j, KIND_SITES[kind]), value[tokens.to(value.device)], rows=rows, positions=tokens,
                          paired=True)
        logits = runner.run(start, hidden, position, h)
    return _prob(logits, answer).view(n, S).cpu()
