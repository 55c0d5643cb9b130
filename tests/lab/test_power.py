"""Power of the paired t-test (lab/power.py), against published tables and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from decoupled.lab.power import (
    SEED_CAP,
    detectable_effect_size,
    paired_t_power,
    power_line,
    power_summary,
    sd_interval,
    seeds_needed,
)


# Cohen (1988), Table 2.4.1, read as a one-sample (paired) test: n for 80% power, two-sided
# alpha 0.05, at the standardized effects 0.2, 0.5, 0.8; and 0.01 at 0.5.
@pytest.mark.parametrize(
    "effect, alpha, expected", [(0.2, 0.05, 199), (0.5, 0.05, 34), (0.8, 0.05, 15), (0.5, 0.01, 51)]
)
def test_seeds_needed_matches_published_tables(effect, alpha, expected):
    assert seeds_needed(effect, alpha) == expected
    assert seeds_needed(-effect, alpha) == expected  # two-sided: the sign does not matter


@pytest.mark.parametrize("n, effect", [(2, 8.0), (5, 1.2), (8, 0.9), (20, 0.5)])
def test_power_matches_a_simulated_paired_t_test(n, effect):
    trials = 20_000
    differences = np.random.default_rng(n).normal(effect, 1.0, size=(trials, n))
    rejected = stats.ttest_1samp(differences, 0.0, axis=1).pvalue < 0.05
    expected = paired_t_power(effect, n, 0.05)
    assert abs(rejected.mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


@pytest.mark.parametrize("n", [2, 3, 5, 10, 40])
def test_detectable_effect_has_the_target_power_and_needs_n_seeds(n):
    effect = detectable_effect_size(n, 0.05)
    assert paired_t_power(effect, n, 0.05) == pytest.approx(0.8, abs=1e-8)
    assert seeds_needed(effect * 1.0001, 0.05) == n


def test_power_at_no_effect_is_alpha_and_unreachable_effects_give_none():
    assert paired_t_power(0.0, 7, 0.05) == pytest.approx(0.05)
    assert seeds_needed(0.0, 0.05) is None
    assert seeds_needed(1e-4, 0.05) is None  # needs far more than SEED_CAP seeds


def test_sd_interval_covers_the_true_sd_95_percent_of_the_time():
    n, trials = 5, 20_000
    samples = np.random.default_rng(0).normal(0.0, 2.0, size=(trials, n))
    low, high = sd_interval(samples.std(axis=1, ddof=1), n)
    coverage = np.mean((low <= 2.0) & (2.0 <= high))
    assert abs(coverage - 0.95) < 4 * math.sqrt(0.95 * 0.05 / trials)


def test_power_summary_gives_a_seed_range_around_the_estimate():
    summary = power_summary(-0.004, 0.00395, 5)  # the default compare's 5 seeds
    assert summary is not None and summary.n == 5
    low, high = summary.needed_range
    assert low is not None and high is not None and low <= summary.needed <= high
    assert summary.detectable == pytest.approx(detectable_effect_size(5, 0.05) * 0.00395)
    line = power_line(summary, significant=False, scale=100.0, unit=" points")
    assert line.startswith("5 seeds detect a difference of ±0.66 points with 80% power")
    assert f"would need about {summary.needed} seeds ({low} to {high} over" in line
    assert "planning estimate" in line
    assert "would need" not in power_line(summary, significant=True, scale=100.0, unit="")


def test_power_summary_is_undefined_without_spread_or_pairs():
    assert power_summary(0.01, 0.0, 5) is None
    assert power_summary(0.01, 0.1, 1) is None
    tiny = power_summary(1e-9, 1.0, 5)
    assert tiny is not None and tiny.needed is None
    assert f"more than {SEED_CAP} seeds" in power_line(tiny, False, 1.0, "")
