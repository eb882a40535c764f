"""Intervals and paired tests on small cases whose answers are known exactly or from published tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qalign.compare.stats import (
    accuracy_interval,
    mcnemar_exact_p,
    paired_comparison,
    seeds_interval,
    sign_flip_p,
    t_quantile,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("successes", "total", "low", "high"),
    # 95% Wilson intervals as tabulated (e.g. Newcombe 1998, Table I: 0/10, 5/10, 10/10; 81/263).
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (81, 263, 0.2553, 0.3662)],
)
def test_wilson_interval_matches_tabulated_values(successes, total, low, high):
    interval = wilson_interval(successes, total)
    assert interval.estimate == successes / total
    assert interval.low == pytest.approx(low, abs=5e-5) and interval.high == pytest.approx(high, abs=5e-5)


def test_wilson_interval_narrows_as_problems_grow():
    """The brief's example: 64 problems at p ≈ 0.45 give ±0.12; four times as many halve it."""
    small, large = wilson_interval(29, 64), wilson_interval(116, 256)
    assert small.high - small.low == pytest.approx(0.2379, abs=1e-3)
    assert (large.high - large.low) / (small.high - small.low) == pytest.approx(0.5, abs=0.02)


def test_mcnemar_exact_counts_discordant_problems_only():
    # 5 problems right only for A, 1 only for B: p = 2 · (C(6,0) + C(6,1)) / 2^6 = 14/64.
    assert mcnemar_exact_p(5, 1) == pytest.approx(14 / 64)
    assert mcnemar_exact_p(1, 5) == pytest.approx(14 / 64)
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(10, 0) == pytest.approx(2 / 1024)


def test_sign_flip_enumerates_every_pattern_for_few_differences():
    # |d| = (1, 2, 0.5): the 8 signed sums are ±3.5, ±2.5, ±1.5, ±0.5; |sum| >= 2.5 for 4 of them.
    assert sign_flip_p([1.0, 2.0, -0.5]) == pytest.approx(0.5)
    assert sign_flip_p([1.0, 2.0, -0.5, 0.0, 0.0]) == pytest.approx(0.5)  # ties (d = 0) carry no sign
    assert sign_flip_p([0.25] * 4) == pytest.approx(2 / 16)
    assert sign_flip_p([0.0, 0.0]) == 1.0


def test_sign_flip_monte_carlo_never_reports_zero():
    # 40 equal positive differences: the exact p is 2/2^40; Monte Carlo counts the observed pattern.
    p = sign_flip_p([0.5] * 40, resamples=2000)
    assert p == pytest.approx(1 / 2001)


def test_paired_comparison_of_greedy_scores_uses_mcnemar():
    a = [1, 1, 0, 1, 0, 1]
    b = [0, 1, 0, 0, 0, 1]
    result = paired_comparison(a, b)
    assert result.test == "mcnemar_exact" and result.problems == 6
    assert result.difference == pytest.approx(2 / 6)
    assert result.p_value == pytest.approx(mcnemar_exact_p(2, 0)) == pytest.approx(0.5)
    assert result.low <= result.difference <= result.high


def test_paired_comparison_of_sampled_scores_uses_sign_flips_and_a_bootstrap():
    a = [0.75, 0.5, 1.0, 0.25]
    b = [0.5, 0.5, 0.5, 0.5]
    result = paired_comparison(a, b)
    assert result.test == "sign_flip"
    assert result.difference == pytest.approx(0.125)
    # d = (0.25, 0, 0.5, -0.25): nonzero |d| = (.25, .5, .25), observed |sum| = .5; the signed sums with
    # |sum| >= .5 are ±1.0 and ±0.5 (twice each): 6 of 8 patterns.
    assert result.p_value == pytest.approx(6 / 8)
    assert not result.excludes_zero()


def test_a_constant_difference_has_a_degenerate_interval():
    result = paired_comparison([0.75] * 10, [0.5] * 10)
    assert (result.low, result.difference, result.high) == pytest.approx((0.25, 0.25, 0.25))
    assert result.excludes_zero()


def test_bootstrap_interval_is_reproducible_and_covers_the_mean():
    scores = [0.0, 0.25, 0.5, 0.75, 1.0] * 20
    first, second = accuracy_interval(scores, seed=3), accuracy_interval(scores, seed=3)
    assert first == second and first.method == "bootstrap"
    assert first.low < 0.5 < first.high
    # The bootstrap half-width is close to the normal one: 1.96 · sd / sqrt(n), sd = sqrt(0.125).
    assert (first.high - first.low) / 2 == pytest.approx(1.96 * math.sqrt(0.125) / 10, rel=0.1)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)
    with pytest.raises(ValueError, match="same non-empty"):
        paired_comparison([1, 0], [1])
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=1.5)


def test_t_quantile_matches_the_tables_for_whole_and_fractional_degrees_of_freedom():
    # Student's t tables; 2.5 and 1.3 degrees of freedom (Satterthwaite's are not whole) from scipy.stats.t.ppf
    for dof, expected in ((1, 12.706205), (2, 4.302653), (10, 2.228139), (30, 2.042272), (2.5, 3.574655),
                          (1.3, 7.500529)):  # fmt: skip
        assert t_quantile(0.975, dof) == pytest.approx(expected, abs=2e-6)
    assert t_quantile(0.95, 3) == pytest.approx(2.353363, abs=2e-6)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)


def test_seeds_interval_on_a_two_by_three_case_by_hand():
    """x = [[1, 0, 1], [0, 0, 1]]: x̄ = 1/2; MS_seeds = 3·2·(1/6)² = 1/6, MS_problems = 2·(0 + 1/4 + 1/4)/2 = 1/2,
    residuals ±1/3, ∓1/6, ∓1/6 → MS_residual = (1/3)/2 = 1/6. The seeds' component (1/6 − 1/6) is not above 0 and
    is dropped: Var·SP = MS_problems = 1/2, Var = 1/12, Satterthwaite df = (1/2)²/((1/2)²/2) = 2,
    half-width = t(0.975, 2)·sqrt(1/12) = 4.302653 × 0.288675."""
    result = seeds_interval([[1, 0, 1], [0, 0, 1]])
    assert result.estimate == 0.5 and result.df == pytest.approx(2.0)
    assert result.seed_means == pytest.approx((2 / 3, 1 / 3))
    half = 4.302653 * math.sqrt(1 / 12)
    assert (result.low, result.high) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-5)
    with pytest.raises(ValueError, match="2 seeds"):
        seeds_interval([[1, 0, 1]])


def test_seeds_interval_covers_the_mean_when_the_seed_moves_the_score_and_a_problems_only_interval_does_not():
    """Simulated comparisons, 3 seeds x 40 problems, x_sj = a_s + b_j + e_sj with a seed effect (σ_a 0.3) larger
    than the problem effect (σ_b 0.1): the seeds × problems interval covers the true mean 0 about 95% of the
    time; an interval over problems alone (of each problem's mean over seeds) covers it far less often."""
    rng = np.random.default_rng(0)
    runs, covered, covered_by_problems = 1000, 0, 0
    for _ in range(runs):
        x = rng.normal(0, 0.3, (3, 1)) + rng.normal(0, 0.1, (1, 40)) + rng.normal(0, 0.2, (3, 40))
        result = seeds_interval(x)
        covered += result.low <= 0 <= result.high
        per_problem = x.mean(axis=0)
        covered_by_problems += abs(per_problem.mean()) <= 1.96 * per_problem.std(ddof=1) / math.sqrt(40)
    assert 0.92 <= covered / runs <= 0.98
    assert covered_by_problems / runs < 0.5
