"""Bootstrap confidence intervals over images.

A benchmark's figure is a ratio of sums over images (CHAIR_S: hallucinating
responses / responses; CHAIR_I: hallucinated / mentioned objects; POPE F1 from
TP, FP, FN). Resampling images with replacement keeps an image's questions or
mentions together, which is the unit the data were sampled in. The resamples
come from `seed` alone, so an interval is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

N_RESAMPLES = 1000
LEVEL = 0.95


def bootstrap_interval(
    counts: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile interval of `statistic` over resampled images.

    `counts`: one row per image, one column per count the statistic needs.
    `statistic`: maps summed counts (resamples x columns) to one value per resample.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or len(counts) == 0:
        raise ValueError("need a (images x counts) matrix with at least one image")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(counts), size=(n_resamples, len(counts)))
    # Summing rows of a multiplicity matrix is the same as summing the picks,
    # without materialising resamples x images x columns.
    multiplicity = np.zeros((n_resamples, len(counts)))
    np.add.at(multiplicity, (np.repeat(np.arange(n_resamples), len(counts)), picks.ravel()), 1.0)
    values = statistic(multiplicity @ counts)
    tail = (1.0 - level) / 2
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def ratio(numerator: int, denominator: int) -> Callable[[np.ndarray], np.ndarray]:
    """Statistic: sum of column `numerator` / sum of column `denominator` (0 where empty)."""

    def statistic(sums: np.ndarray) -> np.ndarray:
        den = sums[:, denominator]
        return np.divide(sums[:, numerator], den, out=np.zeros_like(den), where=den > 0)

    return statistic


def f1_from_counts(tp: int, fp: int, fn: int) -> Callable[[np.ndarray], np.ndarray]:
    """Statistic: F1 = 2TP / (2TP + FP + FN) from the given columns (0 where empty)."""

    def statistic(sums: np.ndarray) -> np.ndarray:
        den = 2 * sums[:, tp] + sums[:, fp] + sums[:, fn]
        return np.divide(2 * sums[:, tp], den, out=np.zeros_like(den), where=den > 0)

    return statistic
