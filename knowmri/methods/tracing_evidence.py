"""The uncertainty of a causal trace (`causal_tracing`) over its noise samples.

ROME (Meng et al. 2022) averages P(answer) over noise samples and reports the mean only; the tracing
engine (`knowmri.methods.tracing_engine`) keeps every sample's P, so the spread costs nothing extra:
per-cell standard errors, t-intervals on indirect effects (paired: restored and corrupted runs share
each noise sample), and a bootstrap over the noise samples for where the peak lies.
"""

from __future__ import annotations

from typing import Any

import torch

from knowmri.stats import t_quantile
from knowmri.token_roles import ROME_ROLES


class Evidence:
    """The uncertainty of a trace over its noise samples: per-cell standard errors, each peak's indirect
    effect with a t-interval (paired with the corrupted run's samples, which share the noise), and the
    peak's layer over bootstrap resamples of the noise samples."""

    BOOTSTRAP = 200

    def __init__(self, res: Any, seed: int) -> None:
        self.res = res
        self.S = res.low_samples.shape[0]
        self.stderr = {k: stderr_of(p) for k, p in res.samples.items()}
        self.low_stderr = float(stderr_of(res.low_samples))
        gen = torch.Generator().manual_seed(seed)
        picks = torch.randint(0, self.S, (self.BOOTSTRAP, self.S), generator=gen)
        self.weights = torch.zeros(self.BOOTSTRAP, self.S).scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float))
        self.weights /= self.S  # row b: how often resample b draws each noise sample, over S

    def effect(self, kind: str, t: int, layer: int) -> dict[str, Any]:
        """The indirect effect of restoring (t, layer): mean, standard error and t-interval over the noise."""
        diff = self.res.samples[kind][t, layer].double() - self.res.low_samples.double()
        mean = float(self.res.grids[kind][t, layer]) - self.res.low
        se = float(stderr_of(diff))
        half = t_quantile(self.S - 1) * se if self.S > 1 else 0.0
        return {"effect": mean, "stderr": se, "ci": [mean - half, mean + half]}

    def peak(self, kind: str, tokens: list[str]) -> dict[str, Any]:
        """The grid's best cell with its effect's interval, and where the best cell lies in resampled noise."""
        grid = self.res.grids[kind]
        t, layer = divmod(int(grid.argmax()), grid.shape[1])
        p = float(grid[t, layer])
        means = self.res.samples[kind].float() @ self.weights.T  # [T, L, B]
        best = means.flatten(0, 1).argmax(0)
        layers, same = best % grid.shape[1], (best // grid.shape[1] == t)
        low_l, high_l = torch.quantile(layers.double(), torch.tensor([0.025, 0.975], dtype=torch.double)).tolist()
        return {"token": t, "token_text": tokens[t], "layer": layer, "score": p, **self.effect(kind, t, layer),
                "layer_range": [int(low_l), int(high_l + 0.5)], "same_token_share": float(same.float().mean())}

    def role_effects(self, kind: str, roles: list[str], tokens: list[str]) -> dict[str, dict[str, Any]]:
        """Per ROME role present, its largest indirect effect over its tokens and the layers, with the interval."""
        grid, out = self.res.grids[kind], {}
        for role in ROME_ROLES:
            rows = [t for t, r in enumerate(roles) if r == role]
            if rows:
                sub = grid[rows]
                i, layer = divmod(int(sub.argmax()), grid.shape[1])
                out[role] = {"token": rows[i], "token_text": tokens[rows[i]], "layer": layer,
                             **self.effect(kind, rows[i], layer)}
        return out


def stderr_of(samples: torch.Tensor) -> torch.Tensor:
    """The standard error of the mean over the last axis (0 with one sample)."""
    n = samples.shape[-1]
    if n < 2:
        return torch.zeros(samples.shape[:-1])
    return samples.double().std(-1, correction=1).float() / n ** 0.5

