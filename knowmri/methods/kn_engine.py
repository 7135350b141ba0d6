"""The knowledge-neurons engine (Dai et al. 2022): integrated gradients over every MLP neuron, batched,
and Dai et al.'s selection of knowledge neurons; `knowledge_neurons` runs it.

`ig_jobs` lists the (scaled position, predicting position, answer token) jobs of a run and `alphas` its
scaling points; `ig_neurons` computes the attributions of every layer's neurons for each job, with rows
of several layers in one batch and the rows that scale layer l starting at block l from the clean
residual stream (`block_replay`), or whole forwards where direct block calls do not reproduce the model;
`row_chunks` says which layers share a batch (the method's estimate reads it too). `coarse_neurons` and
`refine` are the paper's adaptive threshold and its refinement over prompts. The straightforward per-layer
loop the engine equals is `knowmri.testing.kn_reference.ig_neurons_reference`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from knowmri import neuron_units as units
from knowmri.hooks import Hooks
from knowmri.methods.block_replay import BlockRunner, hidden_of, record_calls
from knowmri.models.model import Encoded

ROW_BUDGET_BYTES = 1 << 30  # activations kept for the backward pass, per batch of rows


def ig_jobs(model: Any, enc: Encoded, pairs: Sequence[tuple[int, int]], mode: str,
            subject: Sequence[int] | None = None) -> tuple[list[tuple[int, int, int]], list[int]]:
    """The (scaled position, predicting position, token) jobs of an IG run, and the scaled positions.

    'answer': each answer token's own predicting position (Dai et al.); 'subject': the subject's
    tokens; 'all': every input position (the decoder's for seq2seq). In a causal model (or a
    decoder) a position after the predicting one cannot affect it and is skipped."""
    if mode == "answer":
        jobs = [(p, p, t) for p, t in pairs]
    else:
        if mode == "subject":
            if subject is None:
                raise ValueError("positions='subject' needs the subject (triple_subject) in the prompt")
            if model.kind == "seq2seq":
                raise ValueError("positions='subject' does not apply to a seq2seq model: its neurons are the decoder's")
            candidates = list(subject)
        elif mode == "all":
            candidates = list(range(enc.read_ids.shape[1]))
        else:
            raise ValueError(f"unknown positions mode {mode!r}: use 'answer', 'subject' or 'all'")
        jobs = [(q, p, t) for p, t in pairs for q in candidates if model.kind == "masked" or q <= p]
    return jobs, sorted({q for q, _, _ in jobs})


def alphas(steps: int, riemann: str) -> torch.Tensor:
    """The IG scaling factors: k/steps for k=1..steps (Dai et al., right Riemann sum), or
    linspace(0, 1, steps) as EleutherAI's knowledge-neurons package does."""
    if riemann == "linspace":
        return torch.linspace(0.0, 1.0, steps)
    return torch.arange(1, steps + 1, dtype=torch.float32) / steps


def _put(leaf: torch.Tensor, start: int, stop: int, position: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hooks edit that writes `leaf` ([stop-start, units]) into rows start:stop at `position`."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[start:stop, position] = leaf.to(device=x.device, dtype=x.dtype)
        return x

    return fn


class _Rows:
    """Runs B copies of the input with the neurons scaled at position `scaled`, and returns the
    logits [B, vocab] at the predicting position `predict`.

    Causal models run only positions scaled..predict, over a key/value cache of the clean prefix
    (the rows differ from the clean run only from `scaled` on); other kinds re-run the whole
    input (a seq2seq model's encoder once)."""

    def __init__(self, model: Any, enc: Encoded, scaled: int, predict: int) -> None:
        self.model, self.enc, self.scaled, self.predict = model, enc, scaled, predict
        self.cache: Any = None
        self.incremental = False
        self.encoder_out: torch.Tensor | None = None
        if model.kind == "causal":
            self.cache = self._prefix_cache() if scaled > 0 else None
            self.incremental = scaled == 0 or _expandable(self.cache)
        if not self.incremental:
            self.cache = None
            if model.kind == "seq2seq":
                with torch.no_grad():
                    encoder = model.hf_model.get_encoder()
                    self.encoder_out = encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        full = enc.read_ids.shape[1]
        self.fed = predict - scaled + 1 if self.incremental else full
        self.local = 0 if self.incremental else scaled
        self.prefix = scaled if self.incremental else 0

    def _prefix_cache(self) -> Any:
        return _prefix_cache(self.model, self.enc, self.scaled)

    def __call__(self, batch: int) -> torch.Tensor:
        enc, model = self.enc, self.model
        if self.incremental:
            cache = None
            if self.cache is not None:
                cache = copy.deepcopy(self.cache)
                cache.batch_repeat_interleave(batch)
            out = model.run(input_ids=enc.input_ids[:, self.scaled: self.predict + 1].repeat(batch, 1),
                            attention_mask=enc.attention_mask[:, : self.predict + 1].repeat(batch, 1), use_cache=True,
                            cache=cache)
            return out.logits[:, -1]
        if self.encoder_out is not None:
            out = model.run(encoder_outputs=(self.encoder_out.expand(batch, -1, -1),),
                            attention_mask=enc.attention_mask.repeat(batch, 1),
                            decoder_input_ids=enc.decoder_input_ids.repeat(batch, 1))
            return out.logits[:, self.predict]
        return self.model.forward(**enc.inputs(batch))[:, self.predict]


def _prefix_cache(model: Any, enc: Encoded, length: int) -> Any:
    """The key/value cache of a clean forward over the first `length` positions."""
    with torch.no_grad():
        out = model.run(input_ids=enc.input_ids[:, :length], attention_mask=enc.attention_mask[:, :length],
                        use_cache=True)
    return model.output_cache(out)


def _expandable(cache: Any) -> bool:
    """Whether a model returned a `transformers.Cache` that can be repeated over rows."""
    try:
        from transformers import Cache
    except ImportError:
        return False
    return isinstance(cache, Cache) and hasattr(cache, "batch_repeat_interleave")


def _row_bytes(model: Any, fed: int, prefix: int, blocks: int) -> int:
    """Bytes a row keeps for the backward pass when it runs `blocks` blocks over `fed` tokens."""
    per_token = 12 * model.d_model + 4 * model.d_mlp
    return 4 * (blocks * (fed * per_token + 2 * model.d_model * (prefix + fed)) + 3 * model.vocab_size)


def _budget(model: Any) -> int:
    budget = ROW_BUDGET_BYTES
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        budget = max(budget, int(0.3 * free))
    return budget


def _is_cache(x: Any) -> bool:
    try:
        from transformers import Cache
    except ImportError:
        return False
    return isinstance(x, Cache)


def _layered(cache: Any) -> bool:
    """Whether each layer of a `transformers.Cache` can be repeated over rows on its own."""
    layers = getattr(cache, "layers", None)
    return _is_cache(cache) and bool(layers) and all(hasattr(layer, "batch_repeat_interleave") for layer in layers)


class _StartRunner(BlockRunner):
    """`block_replay.BlockRunner` for the IG rows: rows scaled at layer l start at block l, fed the clean
    residual stream entering it, and rows that start at different blocks share one batch (a
    layer's rows join the batch at its own block). On a causal model the blocks run the fed
    tokens only, over a fresh copy of the clean prefix's key/value cache (`template`)."""

    def __init__(self, *args: Any, template: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.template = template

    def _fresh_cache(self, active: list[int]) -> Any:
        """The prefix cache with layer j repeated over the `active[j]` rows that run block j."""
        if self.template is None:
            return None
        cache = copy.deepcopy(self.template)
        for layer, rows in zip(cache.layers, active):
            if rows:
                layer.batch_repeat_interleave(rows)
        return cache

    def run(self, start: int, hidden: torch.Tensor, position: int, hooks: Hooks | None = None) -> torch.Tensor:
        return self.run_rows([(start, hidden)], position)

    def run_rows(self, entries: Sequence[tuple[int, torch.Tensor]], position: int) -> torch.Tensor:
        """Logits [B, vocab] at `position`; `entries` are (start block, its rows' input [n, T, d]),
        by start block; rows are ordered as the entries."""
        n_layers = self.model.n_layers
        active, rows = [0] * n_layers, 0
        joins: dict[int, list[torch.Tensor]] = {}
        for start, x in entries:
            joins.setdefault(start, []).append(x)
        for layer in range(n_layers):
            rows += sum(x.shape[0] for x in joins.get(layer, []))
            active[layer] = rows
        cache = self._fresh_cache(active)
        hidden: torch.Tensor | None = None
        for layer in range(min(joins), n_layers):
            for x in joins.get(layer, []):
                hidden = x if hidden is None else torch.cat([hidden, x.to(hidden.device, hidden.dtype)])
            assert hidden is not None
            args, kwargs, by_name = self.block_args(layer, hidden.shape[0])
            if cache is not None:
                args = tuple(cache if _is_cache(a) else a for a in args)
                kwargs = {k: cache if _is_cache(v) else v for k, v in kwargs.items()}
            if by_name:
                out = self.model.layers[layer](**kwargs, hidden_states=hidden)
            else:
                out = self.model.layers[layer](hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        assert hidden is not None
        return self.model.readout(hidden[:, position])


class _Direct:
    """The IG rows of one job (scaled position q, predicting position p) run from the scaled layer's
    block on, through `_StartRunner`, with the arguments each block got in a clean run.

    Causal models feed positions q..p over the clean prefix's key/value cache (or positions 0..p
    when q is 0 or the model's cache cannot be repeated per layer); masked and seq2seq models
    feed the whole input (a seq2seq decoder's blocks reuse the recorded encoder output).
    `runner` is None when the direct block calls do not reproduce the model's own logits; the
    caller then falls back to `_Rows` (whole forwards)."""

    def __init__(self, model: Any, enc: Encoded, scaled: int, predict: int) -> None:
        self.model = model
        template = None
        if model.kind == "causal":
            if scaled > 0:
                template = _prefix_cache(model, enc, scaled)
                if not _layered(template):
                    template = None
            first = scaled if template is not None else 0
            ids, mask = enc.input_ids[:, first: predict + 1], enc.attention_mask[:, : predict + 1]
            self.local, self.position, self.prefix = scaled - first, predict - first, first

            def feed(batch: int) -> torch.Tensor:
                cache = None
                if template is not None:
                    cache = copy.deepcopy(template)
                    cache.batch_repeat_interleave(batch)
                return model.run(input_ids=ids.repeat(batch, 1), attention_mask=mask.repeat(batch, 1),
                                 cache=cache).logits[:, self.position]
        else:
            ids, mask = enc.input_ids, enc.attention_mask
            self.local, self.position, self.prefix = scaled, predict, 0

            def feed(batch: int) -> torch.Tensor:
                return model.forward(**enc.inputs(batch))[:, self.position]

        self.fed = self.position + 1 if model.kind == "causal" else enc.read_ids.shape[1]
        with torch.no_grad():
            with record_calls(model) as one:
                expected = feed(1)
            with record_calls(model) as many:
                feed(2)
        calls_one = list(one)
        self.clean = [hidden_of(call) for call in calls_one]  # the clean residual stream entering each block
        runner = _StartRunner(model, calls_one, list(many), 2, ids, mask, template=template)
        with torch.no_grad():
            runner.check(self.clean[0], self.position, expected)
        self.runner: _StartRunner | None = runner if runner.direct else None

    def rows(self, layers: Sequence[int], steps: int) -> torch.Tensor:
        """Logits [len(layers) x steps, vocab]: `steps` rows per layer, entering at that layer's block."""
        entries = [(layer, self.clean[layer].repeat(steps, 1, 1)) for layer in layers]
        assert self.runner is not None
        return self.runner.run_rows(entries, self.position)


Job = tuple[int, int, int]  # (scaled position, predicting position, answer token id)


def row_chunks(model: Any, steps: int, fed: int, prefix: int, batch_size: int, starts: Sequence[int]) -> list[list[int]]:
    """Consecutive layers whose rows share a batch: `batch_size` // steps layers each, or (automatic)
    as many as keep the saved activations within the memory budget (rows of layer l run L - l blocks
    when they start at their own block, L when `starts` is all zeros)."""
    n_layers = model.n_layers
    if batch_size:
        per = max(1, batch_size // steps)
        return [list(range(first, min(n_layers, first + per))) for first in range(0, n_layers, per)]
    budget = _budget(model)
    chunks: list[list[int]] = [[]]
    used = 0
    for layer in range(n_layers):
        cost = steps * _row_bytes(model, fed, prefix, n_layers - starts[layer])
        if chunks[-1] and used + cost > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(layer)
        used += cost
    return chunks


def ig_neurons(model: Any, enc: Encoded, jobs: Sequence[Job], clean: Sequence[torch.Tensor], positions: Sequence[int], *,
               steps: int, riemann: str = "right", batch_size: int = 0,
               progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Integrated gradients of P(answer token) w.r.t. every MLP neuron, batched.

    For a job (q, p, t) and a layer l, layer l's neurons at position q are scaled by each alpha
    (0 -> their clean value, `steps` points) while every other layer runs as it would, and the
    attribution is the clean activation x the mean gradient of P(t) read at position p (teacher
    forced). Rows are (layer, step) pairs, several layers per batch (each layer's hook scales
    only its own rows), one backward per batch. Blocks before l compute the clean run for layer
    l's rows, so those rows start at block l from the clean residual stream entering it (`_Direct`;
    on a causal model only positions q..p, over the clean prefix's key/value cache); where the
    model's blocks cannot be called directly, every row runs the whole model (`_Rows`).
    `clean[l]` holds layer l's clean neurons at `positions` ([len(positions), units], from
    `neuron_readouts.clean_neurons`). Returns [n_jobs, n_layers, units] float32 on the CPU.

    In a mixture-of-experts layer the units are its experts' neurons (`knowmri.neuron_units`); only the
    experts routed at the scaled position are scaled (the others are zero there: their attribution is 0),
    and the routing there is the clean one, since the rows scaling layer l enter it with the clean stream.
    """
    a = alphas(steps, riemann)
    n_layers = model.n_layers
    out = torch.zeros(len(jobs), n_layers, units.width(model))
    done, total = 0, len(jobs) * n_layers
    index = {q: i for i, q in enumerate(positions)}
    for j, (scaled, predict, token) in enumerate(jobs):
        with torch.inference_mode(False):
            direct = _Direct(model, enc, scaled, predict)
        if direct.runner is not None:
            run_rows, local = direct.rows, direct.local
            chunks = row_chunks(model, steps, direct.fed, direct.prefix, batch_size, range(n_layers))
        else:
            runner = _Rows(model, enc, scaled, predict)
            run_rows, local = (lambda layers, n, runner=runner: runner(len(layers) * n)), runner.local
            chunks = row_chunks(model, steps, runner.fed, runner.prefix, batch_size, [0] * n_layers)
        for chunk in chunks:
            leaves = []
            with torch.inference_mode(False), torch.enable_grad(), Hooks(model) as h:
                for k, layer in enumerate(chunk):
                    base = clean[layer][index[scaled]]
                    leaf = (a.to(base.device, base.dtype)[:, None] * base[None, :]).requires_grad_(True)
                    leaves.append(leaf)

                    def make(lo: int, hi: int, leaf: torch.Tensor = leaf, base: torch.Tensor = base,
                             k: int = k, local: int = local) -> Callable[[torch.Tensor], torch.Tensor] | None:
                        if lo == 0 and hi == base.shape[-1]:
                            return _put(leaf, k * steps, (k + 1) * steps, local)
                        if not bool(base[lo:hi].any()):  # an expert not routed here: not computed, not scaled
                            return None
                        return _put(leaf[:, lo:hi], k * steps, (k + 1) * steps, local)

                    units.edit(h, model, layer, make)
                logits = run_rows(chunk, steps)
                prob = logits.float().softmax(-1)[:, token].sum()
                grads = torch.autograd.grad(prob, leaves)
            for layer, grad in zip(chunk, grads):
                base = clean[layer][index[scaled]]
                out[j, layer, : base.shape[-1]] = (grad.float().sum(0) * base.float() / steps).cpu()
            done += len(chunk)
            if progress is not None:
                progress(done / total)
    return out


def coarse_neurons(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Dai et al.'s adaptive threshold: the neurons whose attribution exceeds `threshold` x the
    largest attribution of this prompt (none when no attribution is positive)."""
    peak = float(scores.max())
    if peak <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return scores > threshold * peak


def refine(coarse: Sequence[torch.Tensor], p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The neurons that at least a fraction `p` of the prompts share (count >= p x prompts, as in
    the authors' code), and each neuron's count."""
    counts = torch.stack(list(coarse)).sum(0)
    return (counts >= p * len(coarse) - 1e-9) & (counts > 0), counts
