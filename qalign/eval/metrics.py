"""Sampling metrics over n graded samples per problem: pass@k, maj@k, mean@n.

pass@k is the unbiased estimator of Chen et al. (2021): with ``c`` correct samples out of ``n``,
the chance that a random size-``k`` subset holds at least one correct sample,
``1 - C(n-c, k) / C(n, k)``. The ratio of binomials is computed as a product of ``c`` factors
in log space, so n = 1024 (or 10^6) never builds a huge integer or overflows a float.

maj@k (majority vote / self-consistency) has no closed form, so it is estimated over **disjoint
contiguous blocks**: samples ``[0, k)``, ``[k, 2k)``, …, ``floor(n / k)`` blocks; leftover samples
(when k does not divide n) are not used. Each block is an independent set of k i.i.d. samples, so
the block average is an unbiased estimate of maj@k, and for ``k == n`` it is the single vote over
all samples. Inside a block:

* samples whose answer could not be extracted (key ``None``) do not vote;
* the answer with the most votes wins; a tie goes to the tied answer whose first vote comes
  earliest in the block (sample order is fixed by the per-sample seeds, so this is deterministic);
* the block scores 1 when the winning answer is correct (read from the first sample that gave it:
  samples with equal keys are graded equal), and 0 when no sample in it voted.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from fractions import Fraction

__all__ = [
    "answer_key",
    "default_k_values",
    "maj_at_k",
    "majority_index",
    "mean_at_n",
    "pass_at_k",
    "summarize_problems",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: ``1 - C(n-c, k) / C(n, k)``.

    ``C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)``; the product is summed in log space
    with ``log1p`` and turned back with ``expm1``, which keeps full precision both when the
    result is near 0 (c small, k small) and near 1.
    """
    if n < 1:
        raise ValueError(f"pass@k needs n >= 1 samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"correct count c={c} must be in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, n={n}]")
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0  # every size-k subset contains a correct sample
    log_fail = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return -math.expm1(log_fail)


def mean_at_n(correct: Sequence[bool]) -> float:
    """Fraction of samples that are correct (mean accuracy; equals pass@1 in expectation)."""
    if not correct:
        raise ValueError("mean@n needs at least one sample")
    return sum(bool(x) for x in correct) / len(correct)


def answer_key(extracted: str | None) -> Hashable | None:
    """What votes are counted by: the normalised answer, or its exact value when it is a number.

    Numbers compare by value so that "0.5", "1/2" and "\\frac{1}{2}" pool their votes.
    """
    if extracted is None:
        return None
    from qalign.reward.normalize import normalize_answer, parse_number

    normalized = normalize_answer(extracted)
    if not normalized:
        return None
    value = parse_number(normalized)
    return ("number", value) if isinstance(value, Fraction) else ("text", normalized)


def majority_index(keys: Sequence[Hashable | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when nobody voted.

    The winner is the most frequent non-None key; ties go to the key seen first. The returned
    index is that key's first occurrence.
    """
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    # dicts iterate in insertion (= first-seen) order and max() keeps the first maximum it
    # meets, so a tie goes to the answer seen first.
    winner = max(counts, key=counts.__getitem__)
    return first[winner]


def maj_at_k(keys: Sequence[Hashable | None], correct: Sequence[bool], k: int) -> float:
    """maj@k of one problem, averaged over the ``len(keys) // k`` disjoint contiguous blocks."""
    n = len(keys)
    if len(correct) != n:
        raise ValueError(f"got {n} answer keys but {len(correct)} correctness flags")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, n={n}]")
    blocks = n // k
    wins = 0
    for b in range(blocks):
        block = keys[b * k : (b + 1) * k]
        winner = majority_index(block)
        wins += winner is not None and bool(correct[b * k + winner])
    return wins / blocks


def default_k_values(n: int) -> list[int]:
    """Powers of two up to n, plus n itself: 1, 2, 4, …, n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def summarize_problems(
    problems: Sequence[tuple[Sequence[bool], Sequence[Hashable | None]]], k_values: Sequence[int]
) -> dict[str, object]:
    """Benchmark-level metrics: the mean over problems of each per-problem metric.

    ``problems[j] = (correct flags, answer keys)`` of problem j's samples, in sample order; every
    problem must have the same number of samples n. Returns ``pass@k`` and ``maj@k`` as
    ``{str(k): value}`` dicts plus ``mean@n``.
    """
    if not problems:
        raise ValueError("no problems to summarize")
    sizes = {len(correct) for correct, _ in problems}
    if len(sizes) != 1:
        raise ValueError(f"every problem needs the same number of samples, got sizes {sorted(sizes)}")
    n = sizes.pop()
    bad = [k for k in k_values if not 1 <= k <= n]
    if bad:
        raise ValueError(f"k values {bad} are outside [1, n={n}]")
    count = len(problems)
    pass_k = {str(k): math.fsum(pass_at_k(n, sum(map(bool, c)), k) for c, _ in problems) / count for k in k_values}
    maj_k = {str(k): math.fsum(maj_at_k(keys, c, k) for c, keys in problems) / count for k in k_values}
    mean = math.fsum(mean_at_n(c) for c, _ in problems) / count
    return {"pass@k": pass_k, "maj@k": maj_k, "mean@n": mean}
