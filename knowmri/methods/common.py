"""Shared preparation for methods: the answer, its tokens and positions, the subject span, costs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from knowmri.methods.base import Estimate
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
            max_answer_tokens: int | None = None) -> Prepared:
    """Encode `prompt` (default the sample's) with the ground truth, or the model's top prediction.

    The answer is teacher-forced (never the model's greedy continuation when a ground truth
    exists); `max_answer_tokens` truncates long answers (e.g. a worked solution).
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
            logits = model.forward(**enc.inputs())
        top = int(logits[0, enc.pred_pos].argmax())
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


@cache
def matmul_flops_per_second() -> float:
    """This machine's float32 matmul rate, measured once (for estimates and the FLOP floor)."""
    a = torch.randn(512, 512)
    b = torch.randn(512, 512)
    a @ b
    start = time.perf_counter()
    reps = 8
    for _ in range(reps):
        a @ b
    elapsed = max(time.perf_counter() - start, 1e-6)
    return 2 * 512**3 * reps / elapsed


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.hf_model.parameters())


def forward_cost(model: Any, sample: Sample, forward: int = 1, backward: int = 0, tokens: int | None = None) -> Estimate:
    """An estimate from FLOPs: 2 x params x tokens per forward, 2 x that per backward."""
    if tokens is None:
        prompt = sample.get("prompt") or ""
        tokens = max(1, len(prompt) // 4 + 4)
    params = n_params(model)
    flops = 2 * params * tokens * (forward + 2 * backward)
    seconds = flops / matmul_flops_per_second()
    activations = 4 * tokens * model.d_model * model.n_layers * 8 * (2 if backward else 1)
    return Estimate(seconds=seconds, memory_bytes=int(activations), forward_passes=forward, backward_passes=backward)
