"""pass@k, maj@k and mean@n against hand-computed values."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from qalign.eval.metrics import (
    answer_key,
    default_k_values,
    maj_at_k,
    majority_index,
    mean_at_n,
    pass_at_k,
    summarize_problems,
)


@pytest.mark.parametrize("c", [0, 1, 5, 10])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_pass_at_k_matches_closed_form(c, k):
    n = 10
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)  # math.comb(a, b) = 0 when b > a
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_hand_values():
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(10, 1, 5) == pytest.approx(0.5)  # the one correct sample is in half the subsets
    assert pass_at_k(10, 5, 5) == pytest.approx(1 - 1 / 252)  # C(5,5)/C(10,5)
    assert pass_at_k(10, 5, 10) == 1.0


def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize("c,k", [(3, 100), (1000, 500), (1, 1), (1, 1023), (512, 1), (10, 1000), (1023, 1024)])
def test_pass_at_k_stable_for_n_1024(c, k):
    n = 1024
    value = pass_at_k(n, c, k)
    assert math.isfinite(value) and 0.0 <= value <= 1.0
    assert value == pytest.approx(float(_exact(n, c, k)), rel=1e-12, abs=1e-15)


def test_pass_at_k_small_values_keep_relative_precision():
    # 1 - prod(...) computed naively loses digits when the result is tiny; log1p/expm1 does not.
    n, c, k = 1_000_000, 1, 1
    assert pass_at_k(n, c, k) == pytest.approx(1e-6, rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (10, 11, 1), (10, -1, 1), (10, 3, 0), (10, 3, 11)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_at_n():
    assert mean_at_n([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        mean_at_n([])


def test_majority_index_counts_and_breaks_ties_by_first_seen():
    assert majority_index(["a", "b", "b"]) == 1
    assert majority_index(["b", "a", "a", "b"]) == 0  # tie 2-2: "b" was seen first
    assert majority_index(["a", "b", "b", "a"]) == 0
    assert majority_index([None, "x", None, "y"]) == 1  # unextracted answers do not vote
    assert majority_index([None, None]) is None


def test_maj_at_k_hand_cases():
    keys = ["7", "3", "7", "7", "3", "3", "1", "1"]
    correct = [k == "7" for k in keys]
    # k = n: one vote over all 8 samples: "7" and "3" tie at 3, "7" came first -> correct.
    assert maj_at_k(keys, correct, 8) == 1.0
    # k = 4: blocks [7,3,7,7] -> 7 (right), [3,3,1,1] -> 3 (tie, first seen) (wrong) -> 1/2.
    assert maj_at_k(keys, correct, 4) == 0.5
    # k = 2: [7,3] -> 7 right, [7,7] right, [3,3] wrong, [1,1] wrong -> 2/4.
    assert maj_at_k(keys, correct, 2) == 0.5
    # k = 1: plain accuracy.
    assert maj_at_k(keys, correct, 1) == 3 / 8
    # k = 3: blocks [7,3,7] right, [7,3,3] wrong; the last two samples are left over.
    assert maj_at_k(keys, correct, 3) == 0.5


def test_maj_at_k_block_without_votes_scores_zero():
    keys = [None, None, "5", "5"]
    correct = [False, False, True, True]
    assert maj_at_k(keys, correct, 2) == 0.5
    assert maj_at_k(keys, correct, 4) == 1.0


def test_maj_at_k_majority_beats_a_correct_minority():
    keys = ["4", "5", "5"]
    assert maj_at_k(keys, [True, False, False], 3) == 0.0


def test_maj_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False], 1)
    with pytest.raises(ValueError):
        maj_at_k(["1", "2"], [True, False], 3)


def test_answer_key_pools_equal_numbers():
    assert answer_key("0.5") == answer_key("\\frac{1}{2}") == answer_key("1/2")
    assert answer_key("1,000") == answer_key("1000")
    assert answer_key("x+1") == answer_key("x + 1")
    assert answer_key("x+1") != answer_key("x+2")
    assert answer_key(None) is None


def test_default_k_values():
    assert default_k_values(1) == [1]
    assert default_k_values(8) == [1, 2, 4, 8]
    assert default_k_values(10) == [1, 2, 4, 8, 10]


def test_summarize_problems_means_over_problems():
    problems = [
        ([True, False], ["1", "2"]),  # pass@1 .5, pass@2 1, maj@2: tie -> "1" right
        ([False, False], ["3", None]),
    ]
    summary = summarize_problems(problems, [1, 2])
    assert summary["pass@k"] == {"1": 0.25, "2": 0.5}
    assert summary["maj@k"] == {"1": 0.25, "2": 0.5}
    assert summary["mean@n"] == 0.25
    with pytest.raises(ValueError):
        summarize_problems([([True], ["1"]), ([True, True], ["1", "1"])], [1])
    with pytest.raises(ValueError):
        summarize_problems(problems, [3])
