"""Seed statistics: mean ± std and the paired difference of two methods over the same seeds with its 95 % interval.

Two runs with the same seed share the data order, the augmentation and the initial weights, so the per-seed
difference removes most of the run-to-run noise that mean ± std of each method keeps: the interval is
``mean(d) ± t(0.975, n - 1) · std(d) / sqrt(n)`` with ``d`` the per-seed differences and ``std`` the sample standard
deviation (n - 1). The t quantiles come from a table (exact to 6 digits; no scipy needed); beyond 30 degrees of
freedom the next lower tabulated value is used (a slightly wider, conservative interval).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

__all__ = ["T975", "paired_difference", "t_quantile_975"]

# t(0.975, df): the two-sided 95 % quantile of Student's t distribution.
T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912, 7: 2.364624, 8: 2.306004,
        9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813, 13: 2.160369, 14: 2.144787, 15: 2.131450,
        16: 2.119905, 17: 2.109816, 18: 2.100922, 19: 2.093024, 20: 2.085963, 21: 2.079614, 22: 2.073873,
        23: 2.068658, 24: 2.063899, 25: 2.059539, 26: 2.055529, 27: 2.051831, 28: 2.048407, 29: 2.045230,
        30: 2.042272, 40: 2.021075, 60: 2.000298, 120: 1.979930}
Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t(0.975, df) for df >= 1 (the tabulated value at or below df; the normal quantile past 120)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom (2 seeds), got {df}")
    if df in T975:
        return T975[df]
    if df > 120:
        return Z975
    return T975[max(k for k in T975 if k <= df)]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> dict:
    """``a`` minus ``b`` over the seeds both have (``{seed: value}``): each side's mean ± std, the per-seed
    differences, their mean and std, and the 95 % t interval of the mean difference (None with fewer than 2 seeds).
    ``excludes_zero`` says whether that interval lies entirely on one side of 0."""
    seeds = sorted(set(a) & set(b))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    (ma, sa), (mb, sb), (md, sd) = _mean_std([a[s] for s in seeds]), _mean_std([b[s] for s in seeds]), \
        _mean_std(diffs)
    out = {"seeds": seeds, "n": len(seeds), "mean_a": ma, "std_a": sa, "mean_b": mb, "std_b": sb,
           "differences": diffs, "diff_mean": md, "diff_std": sd, "df": None, "t": None, "ci95": None,
           "excludes_zero": None}
    if len(seeds) >= 2:
        t = t_quantile_975(len(seeds) - 1)
        half = t * sd / math.sqrt(len(seeds))
        out.update({"df": len(seeds) - 1, "t": t, "ci95": [md - half, md + half],
                    "excludes_zero": bool(md - half > 0 or md + half < 0)})
    return out
