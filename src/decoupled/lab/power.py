r"""Power of the paired t-test: the smallest difference n seeds detect, and the seeds a
difference needs.

Formulas (Cohen, *Statistical Power Analysis for the Behavioral Sciences*, 2nd ed. 1988,
ch. 2; Julious, "Sample sizes for clinical trials with Normal data", *Statistics in
Medicine* 23, 2004, §2.1; the same as ``statsmodels.stats.power.TTestPower``):

* With :math:`n` pairs whose differences have standard deviation :math:`\sigma` and mean
  :math:`\Delta`, the paired t statistic follows a noncentral t distribution with
  :math:`n-1` degrees of freedom and noncentrality :math:`\delta\sqrt n`, where
  :math:`\delta = \Delta/\sigma` is the standardized effect. The two-sided test at level
  :math:`\alpha` rejects when :math:`|T| > t_{1-\alpha/2,\,n-1}`, so its power is
  :math:`P(T' > t_{1-\alpha/2,n-1}) + P(T' < -t_{1-\alpha/2,n-1})`.
* The *detectable difference* is the :math:`\Delta` whose power is the target (80%), found by
  root finding in :math:`\delta` and multiplied by :math:`\sigma`.
* The *seeds needed* for a difference :math:`\Delta` are the smallest :math:`n \ge 2` whose
  power reaches the target.

:math:`\sigma` is unknown and estimated by the sample standard deviation :math:`s` of the
:math:`n` observed differences. That estimate is itself uncertain: the chi-square interval
:math:`s\sqrt{(n-1)/\chi^2_{(1+c)/2,\,n-1}} \le \sigma \le s\sqrt{(n-1)/\chi^2_{(1-c)/2,\,n-1}}`
(Wasserman, *All of Statistics*, 2004, §10.2 exercise; any text on the variance of a normal
sample) turns one seed count into a range. Every number here is a planning estimate, not a
guarantee: a difference computed from the data at hand is itself noisy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import optimize, stats

#: Seed counts above this are reported as "more than" it: no compare runs that many.
SEED_CAP = 10_000


def paired_t_power(effect_size: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with ``n`` pairs, for the
    standardized effect ``effect_size`` = mean difference / sd of the differences."""
    if n < 2:
        raise ValueError(f"Invalid n value: {n} (the t-test needs at least 2 pairs)")
    df = n - 1
    critical = stats.t.ppf(1.0 - alpha / 2.0, df)
    noncentrality = abs(effect_size) * math.sqrt(n)
    # P(T' < -c) is written P(T'' > c) with the noncentrality negated: scipy's nct.cdf far in
    # the lower tail returns NaN where this survival function returns the tiny probability.
    return float(
        stats.nct.sf(critical, df, noncentrality) + stats.nct.sf(critical, df, -noncentrality)
    )


def detectable_effect_size(n: int, alpha: float, power: float = 0.8) -> float:
    """The standardized effect the paired t-test with ``n`` pairs detects with ``power``."""
    if not alpha < power < 1.0:
        raise ValueError(f"Invalid power value: {power} (must be in (alpha, 1))")
    high = 1.0
    while paired_t_power(high, n, alpha) < power:  # n = 2 needs an effect near 10 sd
        high *= 2.0
    return float(
        optimize.brentq(lambda d: paired_t_power(d, n, alpha) - power, 0.0, high, xtol=1e-10)
    )


def seeds_needed(effect_size: float, alpha: float, power: float = 0.8) -> int | None:
    """The smallest number of pairs whose paired t-test detects ``effect_size`` with
    ``power``; None when it is more than :data:`SEED_CAP` (or the effect is 0)."""
    if effect_size == 0.0 or paired_t_power(effect_size, SEED_CAP, alpha) < power:
        return None
    # Power grows with n: bisect on [low, high] with power(low) < target <= power(high).
    low, high = 1, SEED_CAP
    while high - low > 1:
        middle = (low + high) // 2
        if middle >= 2 and paired_t_power(effect_size, middle, alpha) >= power:
            high = middle
        else:
            low = middle
    return high


def sd_interval(sd: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Chi-square confidence interval of a normal sample's standard deviation."""
    df = n - 1
    upper_quantile = stats.chi2.ppf((1.0 + confidence) / 2.0, df)
    lower_quantile = stats.chi2.ppf((1.0 - confidence) / 2.0, df)
    return sd * math.sqrt(df / upper_quantile), sd * math.sqrt(df / lower_quantile)


@dataclass(frozen=True)
class PowerSummary:
    """What ``n`` pairs with spread ``sd`` can detect, in the metric's own units.

    ``detectable``: the difference detected with ``power`` at ``alpha``. ``needed``: the
    seeds the observed difference would need at the estimated spread, and ``needed_range``
    the same at the two ends of the sd's interval (None: more than :data:`SEED_CAP`).
    """

    n: int
    sd: float
    alpha: float
    power: float
    detectable: float
    observed: float
    needed: int | None
    needed_range: tuple[int | None, int | None]


def power_summary(
    mean_diff: float, sd: float, n: int, alpha: float = 0.05, power: float = 0.8
) -> PowerSummary | None:
    """Power of a paired comparison of ``n`` pairs with mean difference ``mean_diff`` and
    sample sd ``sd``; None when it is undefined (fewer than 2 pairs, or no spread)."""
    if n < 2 or not sd > 0.0:
        return None
    detectable = detectable_effect_size(n, alpha, power) * sd
    sd_low, sd_high = sd_interval(sd, n)
    return PowerSummary(
        n=n,
        sd=sd,
        alpha=alpha,
        power=power,
        detectable=detectable,
        observed=mean_diff,
        needed=seeds_needed(mean_diff / sd, alpha, power),
        needed_range=(
            seeds_needed(mean_diff / sd_low, alpha, power),
            seeds_needed(mean_diff / sd_high, alpha, power),
        ),
    )


def _count(seeds: int | None) -> str:
    return f"more than {SEED_CAP}" if seeds is None else str(seeds)


def power_line(summary: PowerSummary, significant: bool, scale: float, unit: str) -> str:
    """One sentence: the detectable difference at this n and, for a result that is not
    significant, the seeds the observed difference would need (a range, as the sd is
    estimated). ``scale``/``unit`` show values as the table does (``100``, ``" points"``)."""
    detectable = f"{summary.detectable * scale:.2g}{unit}"
    line = (
        f"{summary.n} seeds detect a difference of ±{detectable} with "
        f"{summary.power * 100:g}% power at α = {summary.alpha:.3g} (sd of the differences "
        f"{summary.sd * scale:.2g}{unit})"
    )
    if significant:
        return line
    observed = f"{abs(summary.observed) * scale:.2g}{unit}"
    if summary.needed is None:
        return f"{line}; the observed {observed} would need {_count(None)} seeds"
    low, high = summary.needed_range
    return (
        f"{line}; the observed {observed} would need about {summary.needed} seeds "
        f"({_count(low)} to {_count(high)} over the sd's 95% interval; a planning estimate)"
    )
