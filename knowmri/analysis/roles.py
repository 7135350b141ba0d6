"""Token roles: which part of a factual prompt each position belongs to.

ROME's token categories (Meng et al. 2022, "Locating and Editing Factual Associations in GPT",
`knowmri.token_roles`): the subject's first, middle and last tokens, the first subsequent token, the
further tokens and the prompt's last token (the one predicting the answer); tokens before the subject
keep a role of their own (`before_subject`). The dataset aggregation keeps ROME's roles apart; the
consensus pools the subject's tokens into `subject` and the tokens after it into `relation`.
"""

from __future__ import annotations

from typing import Any

from knowmri.token_roles import BEFORE, ROLES, ROME_ROLES, span_roles

POOLED_ROLES = (BEFORE, "subject", "relation", "last", "other")
_POOL = {"subject_first": "subject", "subject_middle": "subject", "subject_last": "subject",
         "subsequent_first": "relation", "further": "relation"}

__all__ = ["POOLED_ROLES", "ROLES", "ROME_ROLES", "pooled_role", "token_roles"]


def pooled_role(role: str) -> str:
    """A role of ROLES as the consensus pools it (one of POOLED_ROLES)."""
    return _POOL.get(role, role)


def token_roles(model: Any, sample: Any, n_prompt: int, *, split_subject: bool = True) -> dict[int, str]:
    """Each of the first `n_prompt` positions' role: one of ROLES, or of POOLED_ROLES without `split_subject`.

    The subject is located through `model.token_span`; without a model, a sample, or a subject in
    the prompt, every position but the last is `other`.
    """
    start = stop = None
    subject = sample.get("triple_subject") if sample is not None else None
    if model is not None and subject and subject in (sample.get("prompt") or ""):
        span = model.token_span(sample["prompt"], subject)
        start, stop = span.start, span.stop
    roles = span_roles(n_prompt, start, stop)
    return {i: role if split_subject else pooled_role(role) for i, role in enumerate(roles)}
