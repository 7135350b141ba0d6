"""Shared machinery of the neuron methods (knowledge_neurons, fine): clean neuron activations,
batched integrated gradients over MLP neurons, the per-layer reference loop, value-vector
read-outs, and the figures both methods draw. Defines no method (a helper module)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from knowmri.hooks import Hooks, site
from knowmri.models.model import Encoded

_ROW_BUDGET_BYTES = 1 << 30  # activations kept for the backward pass, per batch of rows


def answer_tokens(model: Any, enc: Encoded) -> list[tuple[int, int]]:
    """(position, token id) of each teacher-forced answer token; the BOS token is never a target."""
    bos = getattr(model.tokenizer, "bos_token_id", None)
    pairs = [(p, t) for p, t in zip(enc.target_positions, enc.target_ids) if t != bos]
    if not pairs:
        raise ValueError("the answer has no token to attribute (it is empty or only a BOS token)")
    return pairs


@torch.no_grad()
def clean_neurons(model: Any, enc: Encoded, positions: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward pass: every layer's neurons at `positions` ([n_pos, d_mlp] per layer, on that
    layer's device) and the logits at those positions [n_pos, vocab]."""
    pos = list(positions)
    with Hooks(model) as h:
        caps = [h.read(site(layer, "mlp.neurons"), positions=pos) for layer in range(model.n_layers)]
        logits = model.forward(**enc.inputs())
    return [c.value[0] for c in caps], logits[0, pos]


def alphas(steps: int, riemann: str) -> torch.Tensor:
    """The IG scaling factors: k/steps for k=1..steps (Dai et al., right Riemann sum), or
    linspace(0, 1, steps) as EleutherAI's knowledge-neurons package does."""
    if riemann == "linspace":
        return torch.linspace(0.0, 1.0, steps)
    return torch.arange(1, steps + 1, dtype=torch.float32) / steps


def _put(leaf: torch.Tensor, start: int, stop: int, position: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hooks edit that writes `leaf` ([stop-start, d_mlp]) into rows start:stop at `position`."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[start:stop, position] = leaf.to(device=x.device, dtype=x.dtype)
        return x

    return fn


class _Rows:
    """Runs B copies of the input and returns the logits [B, vocab] at one predicting position.

    Causal models run only that position, over a key/value cache of the clean prefix (the rows
    differ from the clean run only there and after); other kinds re-run the whole input (a
    seq2seq model's encoder once)."""

    def __init__(self, model: Any, enc: Encoded, position: int) -> None:
        self.model, self.enc, self.position = model, enc, position
        self.cache: Any = None
        self.fed = enc.input_ids.shape[1] if model.kind != "seq2seq" else enc.decoder_input_ids.shape[1]
        self.local = position
        self.encoder_out: torch.Tensor | None = None
        self.incremental = False
        if model.kind == "causal":
            self.cache = self._prefix_cache() if position > 0 else None
            self.incremental = position == 0 or _expandable(self.cache)
            if self.incremental:
                self.fed, self.local = 1, 0
        if not self.incremental:
            self.cache = None
            if model.kind == "seq2seq":
                with torch.no_grad():
                    encoder = model.hf_model.get_encoder()
                    self.encoder_out = encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state

    def _prefix_cache(self) -> Any:
        with torch.no_grad():
            out = self.model.hf_model(input_ids=self.enc.input_ids[:, : self.position],
                                      attention_mask=self.enc.attention_mask[:, : self.position], use_cache=True)
        return out["cache"] if "cache" in out else out.get("past_key_values")

    def prefix_tokens(self) -> int:
        return self.position if self.incremental else 0

    def __call__(self, batch: int) -> torch.Tensor:
        enc, hf = self.enc, self.model.hf_model
        if self.incremental:
            p = self.position
            cache = None
            if self.cache is not None:
                cache = copy.deepcopy(self.cache)
                cache.batch_repeat_interleave(batch)
            out = hf(input_ids=enc.input_ids[:, p: p + 1].repeat(batch, 1),
                     attention_mask=enc.attention_mask[:, : p + 1].repeat(batch, 1), use_cache=True,
                     **{_cache_kwarg(hf): cache})
            return out.logits[:, -1]
        if self.encoder_out is not None:
            out = hf(encoder_outputs=(self.encoder_out.expand(batch, -1, -1),),
                     attention_mask=enc.attention_mask.repeat(batch, 1),
                     decoder_input_ids=enc.decoder_input_ids.repeat(batch, 1), use_cache=False)
            return out.logits[:, self.position]
        return self.model.forward(**enc.inputs(batch))[:, self.position]


def _cache_kwarg(hf_model: Any) -> str:
    """The forward's name for a key/value cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def _expandable(cache: Any) -> bool:
    """Whether a model returned a `transformers.Cache` that can be repeated over rows."""
    try:
        from transformers import Cache
    except ImportError:
        return False
    return isinstance(cache, Cache) and hasattr(cache, "batch_repeat_interleave")


def auto_rows(model: Any, fed: int, prefix: int, steps: int) -> int:
    """Rows per forward/backward that keep the saved activations within a memory budget."""
    per_token = model.n_layers * (12 * model.d_model + 4 * model.d_mlp)
    per_row = 4 * (fed * per_token + model.n_layers * 2 * model.d_model * (prefix + fed) + 3 * model.vocab_size)
    budget = _ROW_BUDGET_BYTES
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        budget = max(budget, int(0.3 * free))
    return max(steps, budget // max(per_row, 1))


def ig_neurons(model: Any, enc: Encoded, clean: list[torch.Tensor], *, steps: int, riemann: str = "right",
               batch_size: int = 0, progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Integrated gradients of P(answer token) w.r.t. every MLP neuron, batched.

    For answer token i (predicted at position p_i, teacher forced) and layer l, the layer's
    neurons at p_i are scaled by each alpha (0 -> clean value, `steps` points) while every
    other layer runs as it would; attribution = clean activation x the mean gradient of
    P(token_i). Rows are (layer, step) pairs, several layers per batch (each hook scales only
    the rows of its own layer), one backward per batch. `clean[l]` is [n_answer, d_mlp], from
    `clean_neurons`. Returns [n_answer, n_layers, d_mlp] float32 on the CPU.
    """
    pairs = answer_tokens(model, enc)
    a = alphas(steps, riemann)
    n_layers = model.n_layers
    out = torch.zeros(len(pairs), n_layers, model.d_mlp)
    done, total = 0, len(pairs) * n_layers
    for i, (position, token) in enumerate(pairs):
        runner = _Rows(model, enc, position)
        rows = batch_size or auto_rows(model, runner.fed, runner.prefix_tokens(), steps)
        per_batch = max(1, rows // steps)
        for first in range(0, n_layers, per_batch):
            chunk = list(range(first, min(n_layers, first + per_batch)))
            leaves = []
            with torch.enable_grad(), Hooks(model) as h:
                for j, layer in enumerate(chunk):
                    base = clean[layer][i]
                    leaf = (a.to(base.device, base.dtype)[:, None] * base[None, :]).requires_grad_(True)
                    leaves.append(leaf)
                    h.edit(site(layer, "mlp.neurons"), _put(leaf, j * steps, (j + 1) * steps, runner.local))
                logits = runner(len(chunk) * steps)
                prob = logits.float().softmax(-1)[:, token].sum()
                grads = torch.autograd.grad(prob, leaves)
            for layer, grad in zip(chunk, grads):
                base = clean[layer][i]
                out[i, layer] = (grad.float().sum(0) * base.float() / steps).cpu()
            done += len(chunk)
            if progress is not None:
                progress(done / total)
    return out


def ig_neurons_reference(model: Any, enc: Encoded, *, steps: int, riemann: str = "right") -> torch.Tensor:
    """The straightforward per-layer loop of Dai et al. / EleutherAI (for tests and benchmarks):
    for each answer token and each layer, a clean forward to read that layer's activation, then
    `steps` scaled copies of the full input in one batch and one backward. Same output as `ig_neurons`."""
    pairs = answer_tokens(model, enc)
    a = alphas(steps, riemann)
    out = torch.zeros(len(pairs), model.n_layers, model.d_mlp)
    for i, (position, token) in enumerate(pairs):
        for layer in range(model.n_layers):
            name = site(layer, "mlp.neurons")
            with torch.no_grad(), Hooks(model) as h:
                cap = h.read(name, positions=[position])
                model.forward(**enc.inputs())
            base = cap.value[0, 0]
            scaled = (a.to(base.device, base.dtype)[:, None] * base[None, :]).requires_grad_(True)
            with torch.enable_grad(), Hooks(model) as h:
                h.replace(name, scaled[:, None, :], positions=[position])
                logits = model.forward(**enc.inputs(steps))
                probs = logits[:, position].float().softmax(-1)[:, token]
                (grad,) = torch.autograd.grad(probs.sum(), scaled)
            out[i, layer] = (grad.float().sum(0) * base.float() / steps).cpu()
    return out


# ---------------------------------------------------------------------- value vectors
def final_norm_gain(model: Any) -> torch.Tensor | None:
    """The final norm's per-dimension gain [d_model] (LayerNorm/RMSNorm weight, Gemma's 1 + w),
    measured as (norm(x) - norm(-x)) / 2x on a zero-mean, unit-RMS x; None without a final norm."""
    norm = model.final_norm
    if norm is None:
        return None
    d = model.d_model
    x = torch.ones(d, device=model.device, dtype=model.dtype)
    x[1::2] = -1.0
    if d % 2:
        x[-1] = 0.0
    with torch.no_grad():
        pos, neg = norm(x[None, None]).float()[0, 0], norm(-x[None, None]).float()[0, 0]
    gain = torch.where(x != 0, (pos - neg) / (2 * x.float()), torch.ones_like(pos))
    return gain


def value_logits(model: Any, layer: int, token_ids: Sequence[int], gain: torch.Tensor | None = None) -> torch.Tensor:
    """[d_mlp, n]: each neuron's value vector (times `gain`) dotted with each token's unembedding."""
    values = model.mlp_value_vectors(layer).detach()
    unembed = model.unembedding.detach()[torch.tensor(list(token_ids), device=model.unembedding.device)]
    unembed = unembed.to(values.device, torch.float32)
    if gain is not None:
        unembed = unembed * gain.to(values.device)
    return values.float() @ unembed.T


def neuron_top_tokens(model: Any, neurons: Sequence[tuple[int, int]], k: int = 5,
                      gain: torch.Tensor | None = None) -> list[list[str]]:
    """The `k` vocabulary tokens each neuron's value vector promotes most (through the unembedding)."""
    if not neurons:
        return []
    unembed = model.unembedding.detach()
    rows = [model.mlp_value_vectors(layer)[unit].detach().float().to(unembed.device) for layer, unit in neurons]
    vectors = torch.stack(rows)
    if gain is not None:
        vectors = vectors * gain.to(unembed.device)
    with torch.no_grad():
        ids = (vectors @ unembed.float().T).topk(min(k, unembed.shape[0]), dim=-1).indices.cpu()
    tok = model.tokenizer
    return [[tok.decode([int(t)]) for t in row] for row in ids]


# ---------------------------------------------------------------------- findings and figures
def ranked(scores: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """The `k` highest entries of a [n_layers, d_mlp] score grid as (layer, unit, score), best first."""
    flat = scores.flatten()
    values, idx = flat.topk(min(k, flat.numel()))
    d = scores.shape[1]
    return [(int(i) // d, int(i) % d, float(v)) for v, i in zip(values, idx)]


def neuron_label(layer: int, unit: int, tokens: Sequence[str] | None = None) -> str:
    head = f"L{layer}.U{unit}"
    return f"{head} ({tokens[0].strip() or repr(tokens[0])})" if tokens else head


def grid_figure(scores: torch.Tensor, *, title: str, colorbar: str, columns: int = 64) -> Any:
    """A layer x neuron heatmap; neurons are binned (`columns` bins, each showing its strongest score)."""
    from knowmri.report import figures

    n_layers, d = scores.shape
    width = max(1, -(-d // columns))
    z, labels = [], []
    for start in range(0, d, width):
        labels.append(f"{start}-{min(d, start + width) - 1}" if width > 1 else str(start))
    for layer in range(n_layers):
        row = scores[layer]
        z.append([float(row[s: s + width][row[s: s + width].abs().argmax()]) for s in range(0, d, width)])
    peak = float(scores.abs().max()) or 1.0
    return figures.heatmap(z, x=labels, y=list(range(n_layers)), title=title, x_title="neurons (binned)",
                           y_title="layer", colorscale="RdBu", zmin=-peak, zmax=peak, colorbar=colorbar)


def top_bar_figure(neurons: list[dict[str, Any]], *, title: str, x_title: str) -> Any:
    """Horizontal bars of the top neurons, labelled with the token each one writes most."""
    from knowmri.report import figures

    shown = neurons[:20][::-1]
    labels = [neuron_label(n["layer"], n["unit"], n.get("top_tokens")) for n in shown]
    return figures.bars(labels, [n["score"] for n in shown], title=title, x_title=x_title, y_title="neuron",
                        horizontal=True)
