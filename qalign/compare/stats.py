"""Confidence intervals and paired tests for held-out accuracy, over problems.

Every method of a comparison answers the same held-out problems, so differences are judged *paired*:
per problem, d_j = score_A(j) − score_B(j), where a score is 0/1 for greedy decoding or the fraction
of n samples that were right (mean@n). Problems are the unit of resampling: the n samples of one
problem are not independent of each other, so they are never resampled as if they were.

- one accuracy: Wilson's score interval for 0/1 scores, a percentile bootstrap over problems otherwise;
- a difference: a percentile bootstrap of mean(d) over problems, and a two-sided p-value from the exact
  McNemar test for 0/1 scores or a sign-flip permutation test of mean(d) otherwise (exact up to
  ``EXACT_SIGN_FLIPS`` non-zero differences, Monte Carlo beyond).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

EXACT_SIGN_FLIPS = 16  # 2^16 sign patterns enumerated; more non-zero differences → Monte Carlo


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    method: str

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """mean(score_A − score_B) over the shared problems, its interval and a two-sided p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    test: str
    problems: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float | str | int]:
        return asdict(self)


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a binomial proportion p̂ = s/N:

        (p̂ + z²/2N ± z·sqrt(p̂(1−p̂)/N + z²/4N²)) / (1 + z²/N)

    Unlike p̂ ± z·se it stays inside [0, 1] and keeps its coverage near p = 0 or 1."""
    if total <= 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total and total > 0, got {successes}/{total}")
    z = _z(confidence)
    p = successes / total
    centre = p + z * z / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    scale = 1 + z * z / total
    return Interval(p, max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale), "wilson")


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.all((values == 0) | (values == 1)))


def _bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` resamples (with replacement, same size) of ``values``."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[picks].mean(axis=1)


def _percentiles(means: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def accuracy_interval(scores: Sequence[float], confidence: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> Interval:  # fmt: skip
    """Interval for the mean per-problem score: Wilson for 0/1 scores, a bootstrap over problems else."""
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        raise ValueError("no problems to score")
    if _is_binary(values):
        return wilson_interval(int(values.sum()), values.size, confidence)
    low, high = _percentiles(_bootstrap_means(values, resamples, seed), confidence)
    return Interval(float(values.mean()), low, high, "bootstrap")


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: under H0 each of the m = only_a + only_b discordant problems
    (right for one method only) is A's with probability ½, so p = min(1, 2·P[Bin(m, ½) ≤ min(only_a, only_b)])."""
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, i) for i in range(min(only_a, only_b) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def sign_flip_p(differences: Sequence[float], resamples: int = 100_000, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(d) = 0: under H0 each d_j is as likely to be −d_j, so
    p = P[|Σ ε_j d_j| ≥ |Σ d_j|] over independent random signs ε_j. Exact (every sign pattern) for up to
    ``EXACT_SIGN_FLIPS`` non-zero differences; else Monte Carlo, counting the observed pattern itself
    (p = (1 + hits) / (1 + resamples), never 0)."""
    d = np.asarray([x for x in differences if x != 0], dtype=float)
    if d.size == 0:
        return 1.0
    observed = abs(d.sum())
    tolerance = 1e-9 * max(1.0, observed)  # sums of the same floats in another order
    if d.size <= EXACT_SIGN_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float(np.mean(np.abs(signs @ d) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 10_000):  # in blocks: bounded memory for many problems
        signs = rng.choice((1.0, -1.0), size=(min(10_000, resamples - start), d.size))
        hits += int(np.sum(np.abs(signs @ d) >= observed - tolerance))
    return (1 + hits) / (1 + resamples)


def paired_comparison(scores_a: Sequence[float], scores_b: Sequence[float], confidence: float = 0.95,
                      resamples: int = 10_000, seed: int = 0) -> PairedComparison:  # fmt: skip
    """A − B on the same problems (``scores_a[j]`` and ``scores_b[j]`` belong to problem j)."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores need the same non-empty problems, got {a.size} and {b.size}")
    d = a - b
    low, high = _percentiles(_bootstrap_means(d, resamples, seed), confidence)
    if _is_binary(a) and _is_binary(b):
        p, test = mcnemar_exact_p(int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))), "mcnemar_exact"
    else:
        p, test = sign_flip_p(d, seed=seed), "sign_flip"
    return PairedComparison(float(d.mean()), low, high, p, test, int(a.size))


# ----------------------------------------------------------------------------- several training seeds


@dataclass(frozen=True)
class SeedsInterval:
    """The mean score (or score difference) over seeds × problems, with an interval that counts both the
    problems drawn and the training seeds drawn."""

    estimate: float
    low: float
    high: float
    df: float  # Satterthwaite's degrees of freedom of the t interval
    seeds: int
    problems: int
    seed_means: tuple[float, ...]  # each seed's mean over the problems

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {**asdict(self), "seed_means": list(self.seed_means)}


def seeds_interval(scores: Sequence[Sequence[float]], confidence: float = 0.95) -> SeedsInterval:
    """``scores[s][j]``: seed s's score (or paired difference) on problem j, the same problems for every seed.

    One run's interval resamples problems only; training again with another seed moves a recipe's score
    too (here by up to 0.09). Seeds and problems are crossed random effects, x_sj = μ + a_s + b_j + e_sj,
    and the grand mean x̄ has

        Var(x̄) = σ_a²/S + σ_b²/P + σ_e²/(SP) = (MS_seeds + MS_problems − MS_residual) / (SP)

    from the two-way ANOVA mean squares (E[MS_seeds] = σ_e² + P·σ_a², E[MS_problems] = σ_e² + S·σ_b²,
    E[MS_residual] = σ_e²); a component estimated below 0 counts as 0. The interval is x̄ ± t·sqrt(Var),
    t on Satterthwaite's degrees of freedom, which with 2–3 seeds are few: the interval is wide because
    three trainings say little about the spread of a fourth. It is approximate: simulated with 256 problems
    and a seed effect from none to larger than the problems' (tests/compare/test_stats.py does one such
    case), it covered the mean 93–96% of the time with 3 seeds and 87–96% with 2."""
    x = np.asarray(scores, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"need scores for >= 2 seeds x >= 2 problems, got shape {x.shape}")
    seeds, problems = x.shape
    mean = float(x.mean())
    seed_means, problem_means = x.mean(axis=1), x.mean(axis=0)
    residual = x - seed_means[:, None] - problem_means[None, :] + mean
    df = {"seeds": seeds - 1, "problems": problems - 1, "residual": (seeds - 1) * (problems - 1)}
    ms = {"seeds": problems * float(np.sum((seed_means - mean) ** 2)) / df["seeds"],
          "problems": seeds * float(np.sum((problem_means - mean) ** 2)) / df["problems"],
          "residual": float(np.sum(residual**2)) / df["residual"]}  # fmt: skip
    # Var·SP = Σ_k c_k·MS_k: σ_e² (MS_residual), plus each component (MS_effect − MS_residual) not below 0.
    coefficient = {"residual": 1.0}
    for effect in ("seeds", "problems"):
        if ms[effect] > ms["residual"]:
            coefficient[effect] = 1.0
            coefficient["residual"] -= 1.0
    variance_sp = sum(c * ms[k] for k, c in coefficient.items())
    spread = sum((c * ms[k]) ** 2 / df[k] for k, c in coefficient.items())  # Satterthwaite: df = V² / Σ (c·MS)²/df
    dof = variance_sp**2 / spread if spread > 0 else math.inf
    half = t_quantile(0.5 + confidence / 2, dof) * math.sqrt(max(variance_sp, 0.0) / (seeds * problems))
    return SeedsInterval(mean, mean - half, mean + half, dof, seeds, problems, tuple(map(float, seed_means)))


def t_quantile(probability: float, dof: float) -> float:
    """Student's t quantile for real ``dof`` > 0 (Satterthwaite's are not whole), by bisection on the CDF,
    which is 1/2 plus the density integrated from 0 (Simpson's rule; |error| < 1e-7 for dof >= 1)."""
    if not 0.5 <= probability < 1:
        raise ValueError(f"probability must be in [0.5, 1), got {probability}")
    if math.isinf(dof) or dof > 1e6:
        return NormalDist().inv_cdf(probability)
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def cdf(t: float) -> float:
        grid = np.linspace(0.0, t, 4001)
        density = np.exp(log_norm - (dof + 1) / 2 * np.log1p(grid**2 / dof))
        step = t / 4000
        return 0.5 + step / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2
