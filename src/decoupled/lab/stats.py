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
  small :math:`n`), a companion that does not assume normality; with 5 seeds its smallest
  possible two-sided p is 1/16 = 0.0625, so it can never be "significant" at 0.05 there.
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
    ``t_stat`` and both p-values are NaN.
    """

    mean_diff: float
    low: float
    high: float
    n: int
    t_stat: float
    p_value: float
    wilcoxon_p: float
    confidence: float = 0.95


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


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"Invalid confidence value: {confidence} (must be in (0, 1))")


def _t_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(mean, low, high) of the Student-t interval; NaN bounds for one value."""
    mean = float(values.mean())
    n = values.size
    if n < 2:
        return mean, math.nan, math.nan
    # Student-t critical value t_{(1+c)/2, n-1} times the standard error s/sqrt(n).
    half_width = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * _standard_error(values)
    return mean, mean - half_width, mean + half_width


def _standard_error(values: np.ndarray) -> float:
    # The spread is measured around the mean; when every value is the same, floating-point
    # rounding of the mean can leave tiny nonzero deviations, so test equality directly.
    if np.all(values == values[0]):
        return 0.0
    return float(values.std(ddof=1) / math.sqrt(values.size))


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with its Student-t confidence interval (see the module docstring).

    ``n == 1`` gives NaN ``low``/``high``; identical values give ``low == high == mean``.
    Raises ValueError for no values or non-finite ones.
    """
    _check_confidence(confidence)
    array = _as_values(values, "values")
    mean, low, high = _t_interval(array, confidence)
    return Interval(mean=mean, low=low, high=high, n=int(array.size), confidence=confidence)


def _wilcoxon_p(differences: np.ndarray) -> float:
    if np.all(differences == 0.0):
        return 1.0  # no evidence of any difference (scipy would divide 0 by 0)
    return float(stats.wilcoxon(differences).pvalue)


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> PairedComparison:
    """Compare values paired by seed: ``a[i]`` and ``b[i]`` come from the same seed.

    Every difference is ``b - a`` (second minus first), so ``mean_diff < 0`` means ``b`` is
    lower. When all differences are equal the t statistic is ±inf and ``p_value`` is 0 if
    they are nonzero, else ``t_stat = 0`` and ``p_value = 1`` (no warnings either way).
    """
    _check_confidence(confidence)
    first, second = _as_values(a, "a"), _as_values(b, "b")
    if first.shape != second.shape:
        raise ValueError(
            f"Invalid b value: {second.size} values for {first.size} in a (pair them by seed)"
        )
    differences = second - first
    n = int(differences.size)
    mean_diff, low, high = _t_interval(differences, confidence)
    if n < 2:
        t_stat = p_value = wilcoxon_p = math.nan
    else:
        standard_error = _standard_error(differences)
        if standard_error == 0.0:
            t_stat = math.copysign(math.inf, mean_diff) if mean_diff != 0.0 else 0.0
            p_value = 0.0 if mean_diff != 0.0 else 1.0
        else:
            t_stat = mean_diff / standard_error
            p_value = float(2.0 * stats.t.sf(abs(t_stat), n - 1))
        wilcoxon_p = _wilcoxon_p(differences)
    return PairedComparison(
        mean_diff=mean_diff,
        low=low,
        high=high,
        n=n,
        t_stat=t_stat,
        p_value=p_value,
        wilcoxon_p=wilcoxon_p,
        confidence=confidence,
    )


def _number(value: float, as_percent: bool) -> str:
    # Three significant digits: seed-to-seed noise makes more digits meaningless.
    return f"{value * 100:.3g}" if as_percent else f"{value:.3g}"


def _p(p_value: float) -> str:
    return "p < 0.001" if p_value < 0.001 else f"p = {p_value:.2g}"


def _seeds(n: int) -> str:
    return f"n = {n} seed" + ("" if n == 1 else "s")


def verdict(
    comparison: PairedComparison,
    names: tuple[str, str] = ("Adam", "AdamW"),
    metric: str = "test error",
    lower_is_better: bool = True,
    alpha: float = 0.05,
    as_percent: bool = False,
) -> str:
    """One line saying which of ``names`` (first, second) is better, judged by the t-test.

    ``comparison`` must come from ``paired_difference(first, second)``. The better one is
    the subject of the sentence and the interval is its advantage, e.g.
    ``"AdamW has lower test error than Adam by 1.23 points (95% CI 0.4 to 2.1, paired t-test
    p = 0.004, n = 5 seeds)"``. ``as_percent`` multiplies by 100 and says "points"
    (percentage points): use it for rates in [0, 1] such as error or accuracy.
    """
    first, second = names
    n = comparison.n
    if n < 2 or math.isnan(comparison.p_value):
        return (
            f"Cannot compare {metric} between {first} and {second}: "
            f"need at least 2 paired seeds ({_seeds(n)})"
        )
    if comparison.p_value >= alpha or comparison.mean_diff == 0.0:
        return (
            f"No significant difference in {metric} between {first} and {second} "
            f"({_p(comparison.p_value)}, {_seeds(n)})"
        )
    second_is_lower = comparison.mean_diff < 0.0
    second_wins = second_is_lower == lower_is_better
    winner, loser = (second, first) if second_wins else (first, second)
    # Advantage of the winner, positive: |second - first|, with the interval flipped to match.
    if second_is_lower:
        size, low, high = -comparison.mean_diff, -comparison.high, -comparison.low
    else:
        size, low, high = comparison.mean_diff, comparison.low, comparison.high
    direction = "lower" if lower_is_better else "higher"
    unit = " points" if as_percent else ""
    level = f"{comparison.confidence * 100:g}%"
    return (
        f"{winner} has {direction} {metric} than {loser} by {_number(size, as_percent)}{unit} "
        f"({level} CI {_number(low, as_percent)} to {_number(high, as_percent)}, "
        f"paired t-test {_p(comparison.p_value)}, {_seeds(n)})"
    )
