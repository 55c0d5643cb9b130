r"""Statistics for comparing two optimizers over the same seeds.

Each seed gives one value per optimizer (say, final test error), and seed ``i`` of both
optimizers shares its data order and initialization, so the values are *paired*: the
comparison works on the per-seed differences :math:`d_i = b_i - a_i` (second minus first),
which removes the seed-to-seed variation that both optimizers share.

Formulas (any statistics text, e.g. Wasserman, *All of Statistics*, §10.2 and §10.9; the same
as ``scipy.stats.t.interval``, ``scipy.stats.ttest_rel`` and ``scipy.stats.wilcoxon``):

* Student-t interval for a mean, from :math:`n` values with sample mean :math:`\bar x` and
  sample standard deviation :math:`s` (divisor :math:`n-1`):
  :math:`\bar x \pm t_{(1+c)/2,\,n-1}\, s/\sqrt n` at confidence :math:`c`.
* Paired t-test: :math:`t = \bar d / (s_d/\sqrt n)` with :math:`n-1` degrees of freedom,
  two-sided :math:`p = 2\,P(T_{n-1} > |t|)`; assumes the differences are roughly normal.
* Wilcoxon signed-rank test on the :math:`d_i` (zeros dropped, exact null distribution for
  small :math:`n`, ties included: scipy ≥ 1.15, whose default no longer switches to the
  normal approximation when there are ties), a companion that does not assume normality;
  with 5 seeds its smallest possible two-sided p is 1/16 = 0.0625, so it can never be
  "significant" at 0.05 there.

When every difference is the same (test error moves in steps of one test example, so this
happens), :math:`s_d = 0` and :math:`t = \bar d/0` is undefined, not infinitely significant:
the t-test's p is NaN and only the Wilcoxon p speaks. A spread at most ``ROUNDING`` (1e-12)
times the largest magnitude among the values counts as zero: float64 rounding (relative
precision 2.2e-16) of values that size leaves spreads thousands of times smaller, while any
real seed-to-seed variation is many orders larger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval. For ``n == 1`` ``low`` and ``high`` are NaN:
    one value says nothing about the spread, and a zero-width interval would claim certainty.
    """

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        """``high - mean`` (NaN when ``n == 1``)."""
        return self.high - self.mean


@dataclass(frozen=True)
class PairedComparison:
    """Paired comparison of ``b`` against ``a``: every difference is ``b - a`` (second − first).

    ``low``/``high`` bound ``mean_diff``; ``p_value`` is the two-sided paired t-test and
    ``wilcoxon_p`` the two-sided Wilcoxon signed-rank test. With ``n < 2`` the interval,
    ``t_stat`` and both p-values are NaN; with ``n >= 2`` equal nonzero differences
    (:attr:`all_equal`) ``t_stat`` and ``p_value`` are NaN. ``sd`` is the differences'
    standard deviation (0 when they are equal up to rounding, NaN for one pair).
    ``adjusted_over`` > 1: the p-values are Holm-adjusted over that many pairs (:func:`holm`).
    """

    mean_diff: float
    low: float
    high: float
    n: int
    t_stat: float
    p_value: float
    wilcoxon_p: float
    confidence: float = 0.95
    sd: float = math.nan
    adjusted_over: int = 1

    @property
    def all_equal(self) -> bool:
        """Every difference is the same nonzero value: the t-test is undefined."""
        return self.n >= 2 and math.isnan(self.p_value)


def _as_values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"Invalid {name} value: empty (need at least one value)")
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"Invalid {name} value: {array.tolist()} (contains NaN or inf; "
            "drop diverged seeds from both sides before comparing)"
        )
    return array


#: A spread at most this fraction of the values' magnitude is float rounding, not data
#: (see the module docstring).
ROUNDING = 1e-12


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"Invalid confidence value: {confidence} (must be in (0, 1))")


def _t_interval(
    values: np.ndarray, confidence: float, scale: float | None = None
) -> tuple[float, float, float]:
    """(mean, low, high) of the Student-t interval; NaN bounds for one value. ``scale``: see
    :func:`_standard_error`."""
    mean = float(values.mean())
    n = values.size
    if n < 2:
        return mean, math.nan, math.nan
    # Student-t critical value t_{(1+c)/2, n-1} times the standard error s/sqrt(n).
    standard_error = _standard_error(values, scale)
    half_width = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * standard_error
    return mean, mean - half_width, mean + half_width


def _standard_error(values: np.ndarray, scale: float | None = None) -> float:
    """s/sqrt(n), or exactly 0 when s is at most ``ROUNDING * scale`` (rounding, not spread;
    ``scale`` defaults to the largest |value|, and for differences is that of the values
    subtracted, whose rounding they carry)."""
    if scale is None:
        scale = float(np.abs(values).max())
    spread = float(values.std(ddof=1))
    if spread <= ROUNDING * scale:
        return 0.0
    return spread / math.sqrt(values.size)


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with its Student-t confidence interval (see the module docstring).

    ``n == 1`` gives NaN ``low``/``high``; identical values give ``low == high == mean``.
    Raises ValueError for no values or non-finite ones.
    """
    _check_confidence(confidence)
    array = _as_values(values, "values")
    mean, low, high = _t_interval(array, confidence)
    return Interval(mean=mean, low=low, high=high, n=int(array.size), confidence=confidence)


def _wilcoxon_p(differences: np.ndarray, scale: float) -> float:
    """The Wilcoxon signed-rank p of the differences, first snapped to a grid of
    ``ROUNDING * scale``: differences equal but for float rounding (0.0003 and
    0.00030000000000000165, from error rates counted in test examples) are ties, and ranked
    apart they can move p across 0.05 (0.047 against 0.098 in one 10-seed case)."""
    grid = ROUNDING * scale
    if grid > 0:
        differences = np.round(differences / grid) * grid
    if np.all(differences == 0.0):
        return 1.0  # no evidence of any difference (scipy would divide 0 by 0)
    return float(stats.wilcoxon(differences).pvalue)


def divergence_p(k: int, n: int, j: int, m: int) -> float:
    """Two-sided p that one arm diverging on ``k`` of ``n`` seeds and the other on ``j`` of
    ``m`` differ by chance: Fisher's exact test on the 2×2 table of diverged and finished
    seeds (exact at any count; it ignores the pairing by seed, so it is conservative)."""
    return float(stats.fisher_exact([[k, n - k], [j, m - j]]).pvalue)


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> PairedComparison:
    """Compare values paired by seed: ``a[i]`` and ``b[i]`` come from the same seed.

    Every difference is ``b - a`` (second minus first), so ``mean_diff < 0`` means ``b`` is
    lower. When all differences are equal (up to rounding, see the module docstring) the
    interval has zero width and the t-test is undefined: ``t_stat`` and ``p_value`` are NaN
    if the differences are nonzero (``wilcoxon_p`` still says how significant they are),
    else ``t_stat = 0`` and ``p_value = 1``. No warnings either way.
    """
    _check_confidence(confidence)
    first, second = _as_values(a, "a"), _as_values(b, "b")
    if first.shape != second.shape:
        raise ValueError(
            f"Invalid b value: {second.size} values for {first.size} in a (pair them by seed)"
        )
    differences = second - first
    n = int(differences.size)
    scale = float(max(np.abs(first).max(), np.abs(second).max()))
    mean_diff, low, high = _t_interval(differences, confidence, scale)
    sd = math.nan
    if n < 2:
        t_stat = p_value = wilcoxon_p = math.nan
    else:
        standard_error = _standard_error(differences, scale)
        sd = standard_error * math.sqrt(n)
        if standard_error == 0.0:  # all differences equal: t = mean/0 is undefined
            no_difference = abs(mean_diff) <= ROUNDING * scale
            t_stat, p_value = (0.0, 1.0) if no_difference else (math.nan, math.nan)
        else:
            t_stat = mean_diff / standard_error
            p_value = float(2.0 * stats.t.sf(abs(t_stat), n - 1))
        wilcoxon_p = _wilcoxon_p(differences, scale)
    return PairedComparison(
        mean_diff=mean_diff,
        low=low,
        high=high,
        n=n,
        t_stat=t_stat,
        p_value=p_value,
        wilcoxon_p=wilcoxon_p,
        confidence=confidence,
        sd=sd,
    )


def _number(value: float, as_percent: bool) -> str:
    # Three significant digits: seed-to-seed noise makes more digits meaningless.
    return f"{value * 100:.3g}" if as_percent else f"{value:.3g}"


def _p(p_value: float, adjusted_over: int = 1) -> str:
    text = "p < 0.001" if p_value < 0.001 else f"p = {p_value:.2g}"
    return text + (f" (Holm-adjusted over {adjusted_over} pairs)" if adjusted_over > 1 else "")


def _seeds(n: int) -> str:
    return f"n = {n} seed" + ("" if n == 1 else "s")


def verdict(
    comparison: PairedComparison,
    names: tuple[str, str] = ("Adam", "AdamW"),
    metric: str = "test error",
    lower_is_better: bool = True,
    alpha: float | None = None,
    as_percent: bool = False,
) -> str:
    """One line saying which of ``names`` (first, second) is better, judged by the t-test.

    ``comparison`` must come from ``paired_difference(first, second)``. The better one is
    the subject of the sentence and the interval is its advantage, e.g.
    ``"AdamW has lower test error than Adam by 1.23 points (95% CI 0.4 to 2.1, paired t-test
    p = 0.004, n = 5 seeds)"``. ``as_percent`` multiplies by 100 and says "points"
    (percentage points): use it for rates in [0, 1] such as error or accuracy.

    ``alpha`` (default ``1 - comparison.confidence``) is the significance level. A larger one
    is refused: the verdict could then name a winner while the printed interval covers 0.
    When all differences are equal the t-test is undefined (:attr:`PairedComparison.all_equal`)
    and the Wilcoxon signed-rank p judges instead, e.g. ``"AdamW has lower test error than
    Adam by 0.1 points on every seed (all differences equal, so no t-test; Wilcoxon p =
    0.031, n = 6 seeds)"``. A comparison with ``adjusted_over`` > 1 carries Holm-adjusted
    p-values, and every p in its verdict says so ("Holm-adjusted over 3 pairs").
    """
    threshold = 1.0 - comparison.confidence
    if alpha is None:
        alpha = threshold
    elif alpha > threshold + ROUNDING:
        raise ValueError(
            f"Invalid alpha value: {alpha} (above 1 - confidence = {threshold:.3g}: a "
            f"{comparison.confidence * 100:g}% interval covering 0 would come with a winner)"
        )
    first, second = names
    n = comparison.n
    m = comparison.adjusted_over
    if n < 2:
        return (
            f"Cannot compare {metric} between {first} and {second}: "
            f"need at least 2 paired seeds ({_seeds(n)})"
        )
    p_value = comparison.wilcoxon_p if comparison.all_equal else comparison.p_value
    second_is_lower = comparison.mean_diff < 0.0
    second_wins = second_is_lower == lower_is_better
    winner, loser = (second, first) if second_wins else (first, second)
    # Advantage of the winner, positive: |second - first|, with the interval flipped to match.
    if second_is_lower:
        size, low, high = -comparison.mean_diff, -comparison.high, -comparison.low
    else:
        size, low, high = comparison.mean_diff, comparison.low, comparison.high
    direction = "lower" if lower_is_better else "higher"
    advantage = f"{_number(size, as_percent)}{' points' if as_percent else ''}"
    if comparison.all_equal:
        if p_value >= alpha:
            return (
                f"No significant difference in {metric} between {first} and {second}: "
                f"{winner} is {direction} by {advantage} on every seed, but with all "
                f"differences equal there is no t-test and the Wilcoxon signed-rank test gives "
                f"{_p(p_value, m)} ({_seeds(n)})"
            )
        return (
            f"{winner} has {direction} {metric} than {loser} by {advantage} on every seed "
            f"(all differences equal, so no t-test; Wilcoxon {_p(p_value, m)}, {_seeds(n)})"
        )
    if p_value >= alpha or comparison.mean_diff == 0.0:
        return (
            f"No significant difference in {metric} between {first} and {second} "
            f"({_p(p_value, m)}, {_seeds(n)})"
        )
    level = f"{comparison.confidence * 100:g}%"
    return (
        f"{winner} has {direction} {metric} than {loser} by {advantage} "
        f"({level} CI {_number(low, as_percent)} to {_number(high, as_percent)}, "
        f"paired t-test {_p(p_value, m)}, {_seeds(n)})"
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (Holm 1979, "A simple sequentially
    rejective multiple test procedure", *Scand. J. Statist.* 6): sorted ascending, the j-th
    smallest (from 1) becomes max over i <= j of min(1, (m - i + 1) p_(i)). Rejecting where
    the adjusted p is below alpha keeps the chance of any false rejection <= alpha, for any
    dependence between the tests. NaN p-values stay NaN and do not count in m."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running, m = 0.0, len(finite)
    for rank, (p_value, index) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p_value))
        adjusted[index] = running
    return adjusted
