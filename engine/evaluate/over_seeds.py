"""Figures over seeds: the mean with a 95 % Student-t interval, and a paired
t-test of one method against another run on the same seeds.

The per-image bootstrap (intervals.py) says how sure one run's figure is; a
comparison of methods must also carry the run-to-run spread (world, models and
training all follow the seed), so it is made over seeds, paired by seed: both
methods of a seed start from the same base models and are judged on the same
held-out scenes. numpy has no t distribution and csr does not depend on scipy;
the regularised incomplete beta below is the standard continued fraction
(Numerical Recipes, 3rd ed., 6.4), exact to about 1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (p in (0.5, 1)), by bisection on the exact tail."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError("need 0.5 < p < 1 and df >= 1")
    tail = 2.0 * (1.0 - p)
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > tail:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        low, high = (mid, high) if t_two_sided_p(mid, df) > tail else (low, mid)
    return (low + high) / 2.0


@dataclass(frozen=True)
class SeedMean:
    mean: float
    low: float  # 95 % interval of the mean over seeds (None-free: one seed gives a zero-width interval)
    high: float
    n: int


def mean_interval(values: Sequence[float], level: float = LEVEL) -> SeedMean:
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return SeedMean(mean, mean, mean, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return SeedMean(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class PairedTest:
    difference: float  # mean of (a - b) over seeds
    low: float
    high: float
    p_value: float  # two-sided paired t-test; nan with one seed
    n: int


def paired_t_test(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> PairedTest:
    """a and b: one figure per seed, in the same seed order."""
    if len(a) != len(b):
        raise ValueError("paired values need the same seeds on both sides")
    differences = [x - y for x, y in zip(a, b, strict=True)]
    interval = mean_interval(differences, level)
    n = len(differences)
    if n < 2:
        return PairedTest(interval.mean, interval.low, interval.high, math.nan, n)
    sd = math.sqrt(sum((d - interval.mean) ** 2 for d in differences) / (n - 1))
    if sd == 0.0:
        p = 1.0 if interval.mean == 0.0 else 0.0
    else:
        p = t_two_sided_p(interval.mean / (sd / math.sqrt(n)), n - 1)
    return PairedTest(interval.mean, interval.low, interval.high, p, n)
