"""Token roles: which part of a factual prompt each position belongs to.

ROME's token categories (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"): the
subject's first, middle and last tokens, the relation tokens after it, and the prompt's last token
(the one predicting the answer); the prompt's first token is kept apart, as it draws attention
whatever it is. The consensus pools the subject's tokens into one role, the dataset aggregation
keeps them apart.
"""

from __future__ import annotations

from typing import Any

ROLES = ("first", "subject_first", "subject_middle", "subject_last", "relation", "last")
POOLED_ROLES = ("first", "subject", "relation", "last")


def token_roles(model: Any, sample: Any, n_prompt: int, *, split_subject: bool = True) -> dict[int, str]:
    """Each of the first `n_prompt` positions' role: one of ROLES, or of POOLED_ROLES without `split_subject`.

    The subject is located through `model.token_span`; without a model, a sample, or a subject in
    the prompt, every position but the first and the last is a relation token. A one-token subject
    is its own last token.
    """
    roles = {i: "relation" for i in range(n_prompt)}
    if n_prompt:
        roles[0] = "first"
    subject = sample.get("triple_subject") if sample is not None else None
    if model is not None and subject and subject in sample.get("prompt", ""):
        span = list(model.token_span(sample["prompt"], subject))
        for j, i in enumerate(span):
            if i < n_prompt:
                if not split_subject:
                    roles[i] = "subject"
                elif j == len(span) - 1:
                    roles[i] = "subject_last"
                else:
                    roles[i] = "subject_first" if j == 0 else "subject_middle"
    if n_prompt:
        roles[n_prompt - 1] = "last"
    return roles
