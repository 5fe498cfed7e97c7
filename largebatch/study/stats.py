"""Seed statistics: the mean over seeds with its 95% Student-t confidence interval (no scipy needed)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with integer `df` degrees of freedom (no scipy needed).

    Inverts the closed-form two-sided mass P(|T| <= t) of Abramowitz & Stegun 26.7.3 (odd df) and
    26.7.4 (even df) by bisection, to ~1e-13; t_quantile(0.975, 2) = 4.302652729911275.
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    mass = 2.0 * p - 1.0
    lo, hi = 0.0, 1.0
    while _t_mass(hi, int(df)) < mass:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-13 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_mass(mid, int(df)) < mass else (lo, mid)
    return 0.5 * (lo + hi)


def _t_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t, Abramowitz & Stegun 26.7.3 / 26.7.4 (finite sums in cos(theta))."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df == 1:
        return 2.0 * theta / math.pi
    first = 1.0 if df % 2 == 0 else math.cos(theta)
    term, total = first, first
    for k in range(2 if df % 2 == 0 else 3, df - 1, 2):  # ratios 1/2, 3/4, ... (even); 2/3, 4/5, ... (odd)
        term *= (k - 1) / k * c2
        total += term
    if df % 2 == 0:
        return math.sin(theta) * total
    return 2.0 / math.pi * (theta + math.sin(theta) * total)


@dataclass(frozen=True)
class SeedStats:
    """Mean over seeds with its sample std and the 95% Student-t half-width t_{0.975,n-1}*std/sqrt(n)."""

    n: int
    mean: float
    std: float | None  # None for n < 2 or a non-finite value
    ci: float | None

    def inside_noise(self, threshold: float) -> bool | None:
        """Whether [mean - ci, mean + ci] contains the threshold; None when there is no interval."""
        if self.ci is None or math.isnan(threshold):
            return None
        return self.mean - self.ci <= threshold <= self.mean + self.ci


def seed_stats(values: Sequence[float]) -> SeedStats:
    """Aggregate one metric over seeds (inf stays inf: a diverged seed has an infinite loss)."""
    n = len(values)
    if n == 0:
        return SeedStats(0, math.nan, None, None)
    mean = math.fsum(values) / n
    if n < 2 or not all(math.isfinite(v) for v in values):
        return SeedStats(n, mean, None, None)
    std = statistics.stdev(values)
    return SeedStats(n, mean, std, t_quantile(0.975, n - 1) * std / math.sqrt(n))
