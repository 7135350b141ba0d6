"""Shared preparation for methods: the answer, its tokens and positions, the subject span, and the
clean forward pass that several methods read (`clean_pass`). The cost model is in `costs`, values derived
from weights in `weight_cache`."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from knowmri import neuron_units
from knowmri.hooks import Hooks, site
from knowmri.methods.base import RunContext
from knowmri.methods.weight_cache import tensor_version
from knowmri.models.model import Encoded
from knowmri.sample import Sample, Span


@dataclass
class Prepared:
    """A sample made ready for one model: the teacher-forced answer and where things are."""

    prompt: str
    answer: str
    answer_source: str  # "ground_truth" or "model prediction"
    enc: Encoded
    tokens: list[str]  # the input's tokens as text
    subject: Span | None

    @property
    def target_ids(self) -> list[int]:
        return self.enc.target_ids

    @property
    def target_positions(self) -> list[int]:
        return self.enc.target_positions

    @property
    def prompt_tokens(self) -> list[str]:
        return self.tokens[: self.enc.prompt_len]


def prepare(model: Any, sample: Sample, *, prompt: str | None = None, need_subject: bool = False,
            max_answer_tokens: int | None = None, ctx: RunContext | None = None) -> Prepared:
    """Encode `prompt` (default the sample's) with the ground truth, or the model's top prediction.

    The answer is teacher-forced (never the model's greedy continuation when a ground truth
    exists); `max_answer_tokens` truncates long answers (e.g. a worked solution). Without a
    ground truth, the forward pass that finds the prediction is the shared `clean_pass` when a
    `ctx` is given (so a method reading that pass runs no second forward).
    """
    prompt = prompt or sample.get("prompt")
    if not prompt:
        raise ValueError("the sample has no prompt")
    truth = sample.get("ground_truth")
    if truth:
        enc = model.encode(prompt, truth)
        source = "ground_truth"
        if max_answer_tokens is not None and len(enc.target_ids) > max_answer_tokens:
            truth = model.tokenizer.decode(enc.target_ids[:max_answer_tokens])
            enc = _truncated(model, enc, max_answer_tokens)
    else:
        enc = model.encode(prompt)
        with torch.inference_mode():
            if ctx is not None:
                clean = clean_pass(model, enc, ctx)
                top = int(clean.logits[clean.rows([enc.pred_pos])[0]].argmax())
            else:
                top = int(model.forward(**enc.inputs())[0, enc.pred_pos].argmax())
        enc = _with_target(model, prompt, enc, top)
        truth = model.tokenizer.decode([top])
        source = "model prediction"
    subject_text = sample.get("triple_subject")
    span = None
    if subject_text:
        if subject_text not in prompt:
            raise ValueError(f"the subject {subject_text!r} does not occur in the prompt {prompt!r}")
        span = model.token_span(prompt, subject_text, encoded=enc)
    elif need_subject:
        raise ValueError("this method needs the subject (triple_subject) to locate it in the prompt")
    ids = enc.input_ids[0].tolist()
    return Prepared(prompt, truth, source, enc, model.to_str_tokens(ids), span)


@dataclass
class CleanPass:
    """What one clean forward pass of an input showed, read once and shared (see `clean_pass`).

    `resid[l]` is the residual stream leaving block l at every position ([L, T, d_model]; the
    decoder's positions for seq2seq); `neurons`, `heads` and `logits` are read at `positions`
    only ([L, P, units], [L, P, H, d_head] or None where the heads cannot be read, [P, vocab]). A
    mixture-of-experts layer's units are its experts' neurons side by side, each times the token's routing
    weight to its expert (`knowmri.neuron_units`), so that activation x value vector is what it writes.
    Tensors stay in the model's dtype, on the device of the unembedding.
    """

    positions: list[int]
    resid: torch.Tensor
    neurons: torch.Tensor
    heads: torch.Tensor | None
    logits: torch.Tensor

    def rows(self, positions: Iterable[int]) -> list[int]:
        """Indices into `neurons`, `heads` and `logits` of input positions (negative ones count from the end)."""
        length = self.resid.shape[1]
        return [self.positions.index(p % length) for p in positions]


@dataclass
class _CleanEntry:
    model: Any  # a weak reference
    state: tuple
    value: CleanPass


def clean_pass(model: Any, enc: Encoded, ctx: RunContext | None = None, *, positions: Iterable[int] = (),
               heads: bool = False) -> CleanPass:
    """The clean forward pass of `enc`, run once per model, input and weights and kept in `ctx.cache`.

    Neurons, heads and logits are read at the answer's positions, the predicting position and
    `positions`; a later request for other positions (or for heads the cached pass could not
    read) runs the pass again, covering both. The entry is keyed by the model object and the
    exact input ids, and checked against the model's device, dtype and weights (their version
    counters, bumped by in-place edits), so a different prompt, answer or model never reads a
    stale pass. Without a `ctx` the pass is run and not kept.
    """
    length = int(enc.read_ids.shape[1])
    wanted = {p % length for p in (*enc.target_positions, enc.pred_pos, *positions)}
    key = _cache_key(model, enc)
    state = _model_state(model)
    entry = ctx.cache.get(key) if ctx is not None else None
    if entry is not None and (entry.model() is not model or entry.state != state):
        entry = None
    if entry is not None:
        cached = entry.value
        if wanted <= set(cached.positions) and (cached.heads is not None or not heads):
            return cached
        wanted |= set(cached.positions)
    value = _run_clean_pass(model, enc, sorted(wanted))
    if heads and value.heads is None:
        raise ValueError(f"{model.architecture}: the attention heads' outputs cannot be read")
    if ctx is not None:
        ctx.cache[key] = _CleanEntry(weakref.ref(model), state, value)
    return value


def clean_passes(model: Any, encs: list[Encoded], contexts: list[RunContext]) -> None:
    """The clean passes of several inputs of a causal model as one forward, each kept in its context's cache.

    The inputs are padded on the right: a causal model's position never attends to a later one, so each
    input's own positions hold what its own pass gives (up to float rounding). Each entry covers every
    position, with the heads where they can be read, so `clean_pass` on it afterwards runs nothing. A
    batch's forward reads the weights once for all its inputs (a small input's pass is bound by that)."""
    if model.kind != "causal" or len(encs) < 2 or any(not bool(e.attention_mask.all()) for e in encs):
        return
    lengths = [int(e.input_ids.shape[1]) for e in encs]
    width = max(lengths)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encs), width), pad, dtype=encs[0].input_ids.dtype, device=encs[0].input_ids.device)
    for i, enc in enumerate(encs):
        ids[i, :lengths[i]] = enc.input_ids[0]
    read_heads = _heads_readable(model)
    readout_device = model.unembedding.device
    with torch.inference_mode(), Hooks(model) as h:
        resid = [h.read(site(layer, "resid_post")) for layer in range(model.n_layers)]
        neurons = [h.read(site(layer, "mlp.neurons")) for layer in range(model.n_layers)]
        heads = [h.read(site(layer, "attn.heads")) for layer in range(model.n_layers)] if read_heads else []
        logits = model.run(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        state = _model_state(model)
        for i, (enc, ctx) in enumerate(zip(encs, contexts)):
            n = lengths[i]

            def stack(caps: list, i: int = i, n: int = n) -> torch.Tensor:
                return torch.stack([c.value[i, :n].to(readout_device) for c in caps])

            value = CleanPass(positions=list(range(n)), resid=stack(resid), neurons=stack(neurons),
                              heads=stack(heads) if read_heads else None, logits=logits[i, :n].to(readout_device))
            ctx.cache[_cache_key(model, enc)] = _CleanEntry(weakref.ref(model), state, value)


def _cache_key(model: Any, enc: Encoded) -> tuple:
    return ("knowmri.clean_pass", id(model), _tensor_key(enc.input_ids), _tensor_key(enc.attention_mask),
            None if enc.decoder_input_ids is None else _tensor_key(enc.decoder_input_ids))


def _heads_readable(model: Any) -> bool:
    try:
        for layer in range(model.n_layers):
            model.component(layer, "attn_o")
        return True
    except ValueError:
        return False


def _tensor_key(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), tuple(t.flatten().tolist()))


def _model_state(model: Any) -> tuple:
    """What must not have changed for a cached pass to hold: placement and the weights' versions."""
    return (str(model.device), model.dtype, tuple(tensor_version(p) for p in model.hf_model.parameters()))


def _run_clean_pass(model: Any, enc: Encoded, positions: list[int]) -> CleanPass:
    readout_device = model.unembedding.device
    read_heads = _heads_readable(model)
    inputs = enc.inputs()
    with torch.inference_mode(), Hooks(model) as h:
        resid = [h.read(site(layer, "resid_post")) for layer in range(model.n_layers)]
        neurons = [neuron_units.read(h, model, layer, positions=positions, weighted=True) for layer in range(model.n_layers)]
        heads = [h.read(site(layer, "attn.heads"), positions=positions) for layer in range(model.n_layers)] if read_heads else []
        logits = model.run(**inputs, keep=positions).logits[0]  # the unembedding only at the positions read

        def stack(caps: list) -> torch.Tensor:
            return torch.stack([c.value[0].to(readout_device) for c in caps])

        return CleanPass(positions=list(positions), resid=stack(resid), neurons=stack(neurons),
                         heads=stack(heads) if read_heads else None, logits=logits.to(readout_device))


def _with_target(model: Any, prompt: str, enc: Encoded, token: int) -> Encoded:
    """`enc` (a bare prompt) given a one-token target."""
    enc.target_ids = [token]
    enc.target_positions = [enc.pred_pos]
    enc.answer = model.tokenizer.decode([token])
    return enc


def _truncated(model: Any, enc: Encoded, n: int) -> Encoded:
    keep = enc.target_positions[n - 1] + 1
    enc.target_ids = enc.target_ids[:n]
    enc.target_positions = enc.target_positions[:n]
    if enc.decoder_input_ids is not None:
        enc.decoder_input_ids = enc.decoder_input_ids[:, :n]
    elif model.kind == "causal":
        enc.input_ids = enc.input_ids[:, :keep]
        enc.attention_mask = enc.attention_mask[:, :keep]
    return enc


def target_logprobs(logits: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """[batch, n_answer_tokens]: log P(answer token i | prefix) from full logits [batch, T, V]."""
    pos = torch.tensor(enc.target_positions, device=logits.device)
    ids = torch.tensor(enc.target_ids, device=logits.device)
    picked = logits[:, pos].float().log_softmax(-1)
    return picked.gather(-1, ids.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)


def answer_prob(logits: torch.Tensor, enc: Encoded, reduce: str = "first") -> torch.Tensor:
    """[batch]: P(answer) from logits: its first token's probability, or the whole answer's ("joint")."""
    lp = target_logprobs(logits, enc)
    return lp[:, 0].exp() if reduce == "first" else lp.sum(-1).exp()
