"""Confidence intervals for the means the read-outs report (noise samples, dataset samples).

Student's t-interval on a mean (`mean_ci`, `mean_ci_columns`), Wilson's score interval on a
proportion (`proportion_ci`), and a standard error (`stderr`). Plain numbers in, plain numbers out,
so every layer (methods, analysis) can use them; scipy is imported only when a quantile is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided Student-t quantile for `df` degrees of freedom (e.g. 2.26 for df 9 at 95%)."""
    if df < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    from scipy.special import stdtrit

    return float(stdtrit(df, 0.5 + level / 2))


def stderr(values: Sequence[float] | np.ndarray, axis: int = -1) -> np.ndarray:
    """The standard error of the mean along `axis` (sample std with n - 1, over sqrt(n)); 0 for one value."""
    x = np.asarray(values, dtype=float)
    n = x.shape[axis]
    if n < 2:
        return np.zeros(np.delete(x.shape, axis % x.ndim)) if x.ndim > 1 else np.zeros(())
    return x.std(axis=axis, ddof=1) / math.sqrt(n)


def mean_ci(values: Sequence[float] | np.ndarray, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean of `values`; the interval is the mean itself for one value."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("a confidence interval needs at least one value")
    mean = float(x.mean())
    if x.size < 2:
        return mean, mean, mean
    half = t_quantile(x.size - 1, level) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def mean_ci_columns(rows: Sequence[Sequence[float]] | np.ndarray,
                    level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-wise `mean_ci` of a [samples, ...] array: (mean, low, high), each of shape [...]."""
    x = np.asarray(rows, dtype=float)
    mean = x.mean(0)
    if x.shape[0] < 2:
        return mean, mean.copy(), mean.copy()
    half = t_quantile(x.shape[0] - 1, level) * x.std(0, ddof=1) / math.sqrt(x.shape[0])
    return mean, mean - half, mean + half


def proportion_ci(count: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval for a proportion `count` / `n` (sound at 0, 1 and small n)."""
    if n <= 0:
        raise ValueError("a proportion needs at least one trial")
    from scipy.special import ndtri

    z = float(ndtri(0.5 + level / 2))
    p = count / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
