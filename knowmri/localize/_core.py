"""Shared plumbing for dataset-level work: samples to teacher-forced batches and splits.

Every dataset-level job (localisation, enhancement) reads samples the same way: the prompt
(optionally through a template) and an answer (the `ground_truth`, or another key such as a
GSM8K worked solution, truncated to `max_answer_tokens`), teacher-forced by
`knowmri.methods.common.prepare`. Batches are right-padded, so every real token sees exactly
the context it would see alone (causal and bidirectional attention both ignore the pads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from knowmri.sample import Sample


@dataclass
class Batch:
    """Right-padded inputs for several samples and where each sample's answer is read."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor  # [P] the batch row of each answer token
    positions: torch.Tensor  # [P] the position whose logits predict it
    ids: torch.Tensor  # [P] the answer token
    answer_mask: torch.Tensor  # [B, T] 1 at each sample's answer-predicting positions
    token_mask: torch.Tensor  # [B, T] 1 at each sample's real (unpadded) positions
    size: int

    def answer_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """[P]: log P(answer token | its prefix) for every answer token of the batch (on the logits' device)."""
        rows, positions, ids = (t.to(logits.device) for t in (self.rows, self.positions, self.ids))
        picked = logits[rows, positions].float().log_softmax(-1)
        return picked.gather(-1, ids[:, None]).squeeze(-1)

    def answer_hits(self, logits: torch.Tensor) -> torch.Tensor:
        """[P] bool: whether each answer token is the top-1 prediction under teacher forcing."""
        rows, positions, ids = (t.to(logits.device) for t in (self.rows, self.positions, self.ids))
        return logits[rows, positions].argmax(-1) == ids

    def per_sample_mean(self, values: torch.Tensor) -> torch.Tensor:
        """[B]: the mean over each sample's answer tokens of a [P] tensor."""
        rows = self.rows.to(values.device)
        sums = torch.zeros(self.size, dtype=values.dtype, device=values.device).index_add(0, rows, values)
        counts = torch.zeros(self.size, dtype=values.dtype, device=values.device).index_add(
            0, rows, torch.ones_like(values))
        return sums / counts

    def per_sample_all(self, flags: torch.Tensor) -> torch.Tensor:
        """[B] bool: whether every answer token of each sample has the flag."""
        misses = torch.zeros(self.size, dtype=torch.long, device=flags.device).index_add(
            0, self.rows.to(flags.device), (~flags).long())
        return misses == 0

    def first_token(self, values: torch.Tensor) -> torch.Tensor:
        """[B]: each sample's value at its first answer token."""
        rows = self.rows.to(values.device)
        first = torch.full((self.size,), values.shape[0], dtype=torch.long, device=values.device)
        first = first.scatter_reduce(0, rows, torch.arange(values.shape[0], device=values.device), "amin")
        return values[first]


def as_samples(dataset: Any, *, samples: int | None = None, path: str | None = None) -> tuple[list[Sample], dict[str, Any]]:
    """A dataset (a built-in name, a `Dataset`, or a sequence of Samples/dicts) as a list, and its description."""
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    info: dict[str, Any] = {}
    if isinstance(dataset, str):
        import knowmri as km

        dataset = km.load_dataset(dataset, path=path)
    if dataset is None:
        raise ValueError("give a dataset: a built-in name, a Dataset, or a list of samples")
    for key in ("name", "description", "origin"):
        value = getattr(dataset, key, None)
        if value:
            info[key] = value
    try:
        items = list(dataset[:samples] if samples is not None and hasattr(dataset, "__getitem__") else dataset)
    except TypeError as err:
        raise ValueError(f"the dataset must be a sequence of samples, got {type(dataset).__name__}") from err
    items = items[:samples] if samples is not None else items
    if not items:
        raise ValueError("the dataset is empty: localisation needs at least one sample")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Sample):
            out.append(item)
        elif isinstance(item, dict):
            out.append(Sample(item))
        else:
            raise ValueError(f"record {i} is a {type(item).__name__}, not a Sample or a dict")
    info.setdefault("name", "samples")
    info["samples"] = len(out)
    return out, info


def check_answers(samples: Sequence[Sample], answer_key: str) -> None:
    """Every sample needs a prompt and an answer to teacher-force (no model-prediction fallback)."""
    for i, s in enumerate(samples):
        if not s.get("prompt"):
            raise ValueError(f"sample {i} has no prompt")
        value = s.get(answer_key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"sample {i} has no {answer_key!r}: capability localisation teacher-forces the answer, "
                             f"so every sample needs one")


def teacher_forced(model: Any, sample: Sample, *, answer_key: str = "ground_truth", template: str | None = None,
                   max_answer_tokens: int | None = None) -> Any:
    """The sample's prompt (through `template`, which holds `{prompt}`) with its answer, encoded."""
    from knowmri.methods.common import prepare

    prompt = sample["prompt"]
    if template:
        prompt = template.replace("{prompt}", prompt)
    answer = sample[answer_key]
    return prepare(model, Sample(prompt=prompt, ground_truth=answer), max_answer_tokens=max_answer_tokens).enc


def collate(model: Any, encs: Sequence[Any]) -> Batch:
    """Right-pad several `Encoded` into one batch on the model's input device."""
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    device = model.device
    width = max(e.input_ids.shape[1] for e in encs)
    seq2seq = encs[0].decoder_input_ids is not None
    ids = torch.full((len(encs), width), pad, dtype=torch.long)
    att = torch.zeros((len(encs), width), dtype=torch.long)
    for b, e in enumerate(encs):
        n = e.input_ids.shape[1]
        ids[b, :n] = e.input_ids[0].cpu()
        att[b, :n] = e.attention_mask[0].cpu()
    inputs = {"input_ids": ids.to(device), "attention_mask": att.to(device)}
    if seq2seq:
        dwidth = max(e.decoder_input_ids.shape[1] for e in encs)
        dec = torch.full((len(encs), dwidth), pad, dtype=torch.long)
        token_mask = torch.zeros((len(encs), dwidth), dtype=torch.long)
        for b, e in enumerate(encs):
            n = e.decoder_input_ids.shape[1]
            dec[b, :n] = e.decoder_input_ids[0].cpu()
            token_mask[b, :n] = 1
        inputs["decoder_input_ids"] = dec.to(device)
    else:
        token_mask = att.clone()
    rows, positions, targets = [], [], []
    for b, e in enumerate(encs):
        rows += [b] * len(e.target_ids)
        positions += list(e.target_positions)
        targets += list(e.target_ids)
    answer_mask = torch.zeros_like(token_mask)
    answer_mask[torch.tensor(rows), torch.tensor(positions)] = 1
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return Batch(inputs, as_t(rows), as_t(positions), as_t(targets), answer_mask.to(device), token_mask.to(device),
                 len(encs))


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive groups of `batch_size` indices (the last may be shorter)."""
    return [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train / held-out split of range(n), both non-empty."""
    if n < 2:
        raise ValueError(f"enhancement needs at least 2 samples (a training and a held-out split), got {n}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)

