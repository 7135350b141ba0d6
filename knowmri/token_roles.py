"""ROME's token roles in a factual prompt (Meng et al. 2022, "Locating and Editing Factual Associations
in GPT", the rows of its average causal effects): the subject's first, middle and last tokens, the
first token after the subject, the further tokens, and the prompt's last token (the one predicting
the answer). Tokens before the subject are not among ROME's rows and keep a role of their own.

Pure positions in, names out (`span_roles`), so a method can label its findings and the dataset
aggregation can pool them (`knowmri.analysis.roles` finds the subject through the model).
"""

from __future__ import annotations

BEFORE = "before_subject"
#: ROME's six rows, in its order.
ROME_ROLES = ("subject_first", "subject_middle", "subject_last", "subsequent_first", "further", "last")
#: Every role a position can have: before the subject, ROME's six, and `other` where no subject is known.
ROLES = (BEFORE, *ROME_ROLES, "other")


def span_roles(n_tokens: int, start: int | None, stop: int | None) -> list[str]:
    """Each of `n_tokens` positions' role, the subject occupying positions start..stop-1 (None: unknown).

    The last position is always `last` (it predicts the answer), even where it is the subject's last
    token or the first one after it; a one-token subject is its own last token; without a subject
    every other position is `other`.
    """
    if start is None or stop is None or not 0 <= start < stop:
        roles = ["other"] * n_tokens
    else:
        roles = []
        for i in range(n_tokens):
            if i < start:
                roles.append(BEFORE)
            elif i == stop - 1:
                roles.append("subject_last")
            elif i == start:
                roles.append("subject_first")
            elif i < stop:
                roles.append("subject_middle")
            else:
                roles.append("subsequent_first" if i == stop else "further")
    if n_tokens:
        roles[-1] = "last"
    return roles
