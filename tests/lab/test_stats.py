"""Comparison statistics, checked against scipy's own implementations on several inputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from decoupled.lab.stats import (
    Interval,
    PairedComparison,
    holm,
    mean_ci,
    paired_difference,
    verdict,
)

SAMPLES = [
    [0.12, 0.15, 0.11, 0.14, 0.13],
    [1.0, 2.0],
    [3.5, -1.25, 7.0, 0.0, 2.5, 2.5, 10.0],
    np.random.default_rng(0).normal(0.3, 0.05, size=20).tolist(),
]

# (a, b) paired by seed; b - a is the difference.
PAIRS = [
    ([0.120, 0.150, 0.110, 0.140, 0.130], [0.105, 0.139, 0.101, 0.122, 0.118]),  # b clearly lower
    ([0.12, 0.15, 0.11, 0.14, 0.13], [0.13, 0.14, 0.12, 0.13, 0.14]),  # mixed signs
    ([1.0, 2.0], [1.5, 2.25]),
    ([3.0, 1.0, 4.0, 1.0, 5.0, 9.0], [2.0, 7.0, 1.0, 8.0, 2.0, 8.0]),
    (np.arange(12.0).tolist(), (np.arange(12.0) + np.linspace(0.5, 1.5, 12) ** 2).tolist()),
]


@pytest.fixture(autouse=True)
def no_warnings():
    """Every function here must run without numpy/scipy warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("values", SAMPLES)
@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_mean_ci_matches_scipy_t_interval(values, confidence):
    interval = mean_ci(values, confidence)
    expected_low, expected_high = stats.t.interval(
        confidence, len(values) - 1, loc=np.mean(values), scale=stats.sem(values)
    )
    assert isinstance(interval, Interval)
    assert interval.n == len(values) and interval.confidence == confidence
    assert interval.mean == pytest.approx(np.mean(values), rel=1e-12)
    assert interval.low == pytest.approx(expected_low, rel=1e-10)
    assert interval.high == pytest.approx(expected_high, rel=1e-10)
    assert interval.half_width == pytest.approx(interval.high - interval.mean)


def test_mean_ci_of_one_value_has_nan_bounds():
    interval = mean_ci([0.25])
    assert interval.mean == 0.25 and interval.n == 1
    assert math.isnan(interval.low) and math.isnan(interval.high)
    assert math.isnan(interval.half_width)


def test_mean_ci_of_identical_values_has_zero_width():
    interval = mean_ci([0.1, 0.1, 0.1])  # the mean rounds; the width must still be exactly 0
    assert interval.low == interval.mean == interval.high


@pytest.mark.parametrize(
    "values, message",
    [([], "empty"), ([0.1, math.nan], "NaN"), ([0.1, math.inf], "NaN or inf")],
)
def test_mean_ci_rejects_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        mean_ci(values)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95])
def test_rejects_bad_confidence(confidence):
    with pytest.raises(ValueError, match="Invalid confidence value"):
        mean_ci([1.0, 2.0], confidence)
    with pytest.raises(ValueError, match="Invalid confidence value"):
        paired_difference([1.0, 2.0], [1.0, 3.0], confidence)


@pytest.mark.parametrize("a, b", PAIRS)
def test_paired_difference_matches_scipy(a, b):
    comparison = paired_difference(a, b)
    differences = np.subtract(b, a)
    ttest = stats.ttest_rel(b, a)  # same sign convention: second minus first
    low, high = stats.t.interval(
        0.95, len(a) - 1, loc=differences.mean(), scale=stats.sem(differences)
    )
    assert isinstance(comparison, PairedComparison)
    assert comparison.n == len(a)
    assert comparison.mean_diff == pytest.approx(differences.mean(), rel=1e-12)
    assert comparison.t_stat == pytest.approx(ttest.statistic, rel=1e-10)
    assert comparison.p_value == pytest.approx(ttest.pvalue, rel=1e-10)
    assert comparison.low == pytest.approx(low, rel=1e-10)
    assert comparison.high == pytest.approx(high, rel=1e-10)
    # scipy on the differences as decimals: equal ones tie (float rounding would rank them apart)
    expected_w = stats.wilcoxon(np.round(differences, 10)).pvalue
    assert comparison.wilcoxon_p == pytest.approx(expected_w, rel=1e-12)


def test_differences_equal_but_for_float_rounding_tie_in_the_wilcoxon_test():
    """Error rates counted in test examples: the float differences b − a of equal changes
    differ in their last bits. Ranked apart they make p = 0.047 here; tied, as they are,
    p = 0.078 (scipy on the exact decimal differences)."""
    a = [0.0169, 0.0229, 0.0229, 0.0186, 0.0123, 0.012, 0.0173, 0.011, 0.0174, 0.0107]
    b = [0.0171, 0.0229, 0.0232, 0.0187, 0.0123, 0.0123, 0.0171, 0.011, 0.0179, 0.0109]
    assert stats.wilcoxon(np.subtract(b, a)).pvalue < 0.05  # the float differences, untied
    comparison = paired_difference(a, b)
    expected = stats.wilcoxon(np.round(np.subtract(b, a), 10)).pvalue
    assert comparison.wilcoxon_p == pytest.approx(expected, rel=1e-12)
    assert comparison.wilcoxon_p == pytest.approx(0.078125)


def test_paired_difference_sign_is_second_minus_first():
    comparison = paired_difference([1.0, 2.0, 3.0], [1.5, 2.4, 3.7])
    assert comparison.mean_diff > 0 and comparison.t_stat > 0
    assert comparison.low < comparison.mean_diff < comparison.high


@pytest.mark.parametrize("shift", [0.25, -0.5, 0.1])
def test_paired_difference_with_differences_equal_up_to_rounding(shift):
    a = [0.1, 0.2, 0.3, 0.4, 0.5]
    comparison = paired_difference(a, [value + shift for value in a])  # no warnings (fixture)
    assert comparison.mean_diff == pytest.approx(shift) and comparison.all_equal
    assert math.isnan(comparison.t_stat) and math.isnan(comparison.p_value)
    assert comparison.low == comparison.mean_diff == comparison.high


def test_quantized_differences_equal_up_to_rounding_give_no_t_test():
    """Test error moves in steps of 1/1000: three seeds each 0.1 points better differ only by
    float rounding (s_d ≈ 2e-18, t ≈ -9e14 if computed); the t-test is undefined, not p = 0."""
    a, b = [0.017, 0.018, 0.016], [0.016, 0.017, 0.015]
    differences = np.subtract(b, a)
    assert 0 < differences.std(ddof=1) < 1e-17  # not exactly equal
    comparison = paired_difference(a, b)
    assert comparison.all_equal and math.isnan(comparison.p_value)
    assert comparison.low == comparison.mean_diff == comparison.high
    assert comparison.wilcoxon_p == pytest.approx(stats.wilcoxon(differences).pvalue)


def test_paired_difference_of_exactly_constant_differences():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    comparison = paired_difference(a, a + 0.5)  # exact in binary
    assert math.isnan(comparison.t_stat) and math.isnan(comparison.p_value)
    assert comparison.low == comparison.high == 0.5 and comparison.all_equal
    assert comparison.wilcoxon_p == pytest.approx(stats.wilcoxon([0.5] * 4).pvalue)
    same = paired_difference(a, a)
    assert (same.mean_diff, same.t_stat, same.p_value, same.wilcoxon_p) == (0.0, 0.0, 1.0, 1.0)
    assert not same.all_equal  # no difference at all: p = 1, nothing undefined


def test_mean_ci_of_values_equal_up_to_rounding_has_zero_width():
    interval = mean_ci([0.1 + 0.2, 0.3, 0.3])  # 0.30000000000000004 and 0.3
    assert interval.low == interval.mean == interval.high


def test_paired_difference_of_one_pair_is_undefined():
    comparison = paired_difference([0.2], [0.1])
    assert comparison.n == 1 and comparison.mean_diff == pytest.approx(-0.1)
    for value in (
        comparison.low,
        comparison.high,
        comparison.t_stat,
        comparison.p_value,
        comparison.wilcoxon_p,
    ):
        assert math.isnan(value)


def test_paired_difference_rejects_unpaired_lengths():
    with pytest.raises(ValueError, match="pair them by seed"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


# ---------------------------------------------------------------- verdict

ADAM = [0.120, 0.150, 0.110, 0.140, 0.130]
ADAMW = [0.105, 0.139, 0.101, 0.122, 0.118]  # lower on every seed


def test_verdict_when_second_is_better():
    comparison = paired_difference(ADAM, ADAMW)
    line = verdict(comparison, as_percent=True)
    advantage = -comparison.mean_diff * 100
    expected_start = f"AdamW has lower test error than Adam by {advantage:.3g} points (95% CI "
    assert line.startswith(expected_start)
    assert f"CI {-comparison.high * 100:.3g} to {-comparison.low * 100:.3g}," in line
    assert f"paired t-test p = {comparison.p_value:.2g}, n = 5 seeds)" in line
    assert "\n" not in line


def test_verdict_when_first_is_better():
    comparison = paired_difference(ADAMW, ADAM)  # names still ("Adam", "AdamW")
    line = verdict(comparison, names=("Adam", "AdamW"))
    assert line.startswith(f"Adam has lower test error than AdamW by {comparison.mean_diff:.3g} (")
    assert "points" not in line
    assert f"CI {comparison.low:.3g} to {comparison.high:.3g}," in line


@pytest.mark.parametrize(
    "a, b, expected_start",
    [
        (ADAM, ADAMW, "Adam has higher test accuracy than AdamW"),
        (ADAMW, ADAM, "AdamW has higher test accuracy than Adam"),
    ],
)
def test_verdict_when_higher_is_better(a, b, expected_start):
    line = verdict(paired_difference(a, b), metric="test accuracy", lower_is_better=False)
    assert line.startswith(expected_start)
    assert " by 0.0" in line  # the advantage is reported as a positive number


def test_verdict_without_significant_difference():
    comparison = paired_difference([0.12, 0.15, 0.11, 0.14, 0.13], [0.13, 0.14, 0.12, 0.13, 0.14])
    assert comparison.p_value > 0.05
    assert verdict(comparison) == (
        "No significant difference in test error between Adam and AdamW "
        f"(p = {comparison.p_value:.2g}, n = 5 seeds)"
    )


def test_verdict_alpha_and_tiny_p_values():
    comparison = paired_difference(ADAM, ADAMW)
    assert verdict(comparison, alpha=comparison.p_value / 2).startswith("No significant")
    a = np.arange(12.0)
    tiny = paired_difference(a, a + np.linspace(0.5, 1.5, 12) ** 2)  # p ≈ 1.3e-4
    line = verdict(tiny, metric="loss", names=("SGD", "SGDW"))
    assert line.startswith("SGD has lower loss than SGDW by 1.1 (95% CI 0.678 to 1.52, ")
    assert line.endswith("paired t-test p < 0.001, n = 12 seeds)")


# a 95% interval excludes 0, a 99% one does not (paired t-test p = 0.034)
MIDDLING = ([0.12, 0.15, 0.11, 0.14, 0.13], [0.11, 0.14, 0.11, 0.12, 0.12])


def test_verdict_alpha_defaults_to_one_minus_confidence():
    at_95 = paired_difference(*MIDDLING)
    assert 0.01 < at_95.p_value < 0.05 and at_95.high < 0
    assert verdict(at_95).startswith("AdamW has lower test error than Adam")
    at_99 = paired_difference(*MIDDLING, confidence=0.99)
    assert at_99.low < 0 < at_99.high
    assert verdict(at_99) == (
        "No significant difference in test error between Adam and AdamW (p = 0.034, n = 5 seeds)"
    )
    assert verdict(at_99, alpha=0.001).startswith("No significant")  # stricter: allowed
    with pytest.raises(ValueError, match=r"Invalid alpha value: 0.05 \(above 1 - confidence"):
        verdict(at_99, alpha=0.05)


def test_verdict_with_all_differences_equal_relies_on_wilcoxon():
    # two seeds, AdamW 0.5 points lower on both: no t-test, Wilcoxon p = 0.5
    two = paired_difference([0.020, 0.021], [0.015, 0.016])
    assert verdict(two, as_percent=True) == (
        "No significant difference in test error between Adam and AdamW: AdamW is lower by "
        "0.5 points on every seed, but with all differences equal there is no t-test and the "
        "Wilcoxon signed-rank test gives p = 0.5 (n = 2 seeds)"
    )
    # six seeds, each 0.1 points lower (equal up to rounding): Wilcoxon p = 1/32
    a = [0.017, 0.018, 0.016, 0.019, 0.020, 0.015]
    six = paired_difference(a, [round(value - 0.001, 3) for value in a])
    assert six.all_equal and six.wilcoxon_p == pytest.approx(1 / 32)
    assert verdict(six, as_percent=True) == (
        "AdamW has lower test error than Adam by 0.1 points on every seed (all differences "
        "equal, so no t-test; Wilcoxon p = 0.031, n = 6 seeds)"
    )


def test_verdict_with_one_seed_or_no_difference():
    assert verdict(paired_difference([0.2], [0.1])) == (
        "Cannot compare test error between Adam and AdamW: need at least 2 paired seeds "
        "(n = 1 seed)"
    )
    same = paired_difference([0.1, 0.2], [0.1, 0.2])
    assert verdict(same) == (
        "No significant difference in test error between Adam and AdamW (p = 1, n = 2 seeds)"
    )


def test_verdict_uses_the_comparison_confidence():
    comparison = paired_difference(ADAM, ADAMW, confidence=0.9)
    assert "(90% CI " in verdict(comparison)


# Values on a 0.01 grid, as test error moves in steps of one test example: ties between
# differences, zero differences and n = 2 all come up.
_grid_values = st.lists(st.integers(0, 6), min_size=2, max_size=12).map(
    lambda ints: [0.1 + 0.01 * i for i in ints]
)


@settings(max_examples=75, deadline=None, derandomize=True)
@given(data=st.data())
def test_statistics_match_scipy_with_ties_zeros_and_two_pairs(data):
    a = data.draw(_grid_values)
    b = data.draw(st.lists(st.integers(0, 6), min_size=len(a), max_size=len(a)))
    b = [0.1 + 0.01 * i for i in b]
    differences = np.subtract(b, a)
    comparison = paired_difference(a, b)
    varies = comparison.low != comparison.high  # not every difference equal (up to rounding)
    if varies:
        ttest = stats.ttest_rel(b, a)
        low, high = stats.t.interval(
            0.95, len(a) - 1, loc=differences.mean(), scale=stats.sem(differences)
        )
        assert comparison.p_value == pytest.approx(ttest.pvalue, rel=1e-9)
        assert comparison.t_stat == pytest.approx(ttest.statistic, rel=1e-9)
        assert (comparison.low, comparison.high) == pytest.approx((low, high), rel=1e-9)
        interval = mean_ci(a)
        if interval.low != interval.high:
            expected = stats.t.interval(0.95, len(a) - 1, loc=np.mean(a), scale=stats.sem(a))
            assert (interval.low, interval.high) == pytest.approx(expected, rel=1e-9)
    if np.any(np.abs(differences) > 1e-9):
        expected_w = stats.wilcoxon(np.round(differences, 10)).pvalue  # ties kept as ties
        assert comparison.wilcoxon_p == pytest.approx(expected_w, rel=1e-12)
    else:
        assert comparison.wilcoxon_p == 1.0


@pytest.mark.parametrize(
    "p_values, expected",
    [
        ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),  # the step-down and its max
        ([0.5], [0.5]),
        ([0.3, 0.6], [0.6, 0.6]),
        ([0.02, math.nan, 0.04], [0.04, math.nan, 0.04]),  # NaN does not count in m
        ([0.9, 0.8, 0.7], [1.0, 1.0, 1.0]),  # capped at 1
        ([0.9, 0.2, 0.3], [0.9, 0.6, 0.6]),
    ],
)
def test_holm_adjustment(p_values, expected):
    assert holm(p_values) == pytest.approx(expected, nan_ok=True)
