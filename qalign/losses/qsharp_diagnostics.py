"""Diagnostics of a Q# value model as pure functions: did the fit learn more than the base success rate?

A value model that only learned the mean reward is a *constant* predictor. It scores the constant's
held-out loss, ranks held-out roll-outs no better than chance, and guides decoding only through the
top-k truncation (every candidate gets the same offset). Each function below measures one of these
against the constant it should beat:

- ``constant_bernoulli_loss`` / ``constant_histogram_loss``: the held-out loss of the best constant fitted
  on the training data (to set beside the value model's held-out loss, ``per_row_value_loss``);
- ``auroc``: how well the predicted E[z] ranks held-out roll-outs by their final reward (0.5 = chance);
- ``constant_value_kl`` / ``topk_truncation_kl``: KL(π_guided ‖ π_ref) of a constant value model at the same
  η and top-k, computed from π_ref's logits alone.

Weights: the training loss averages over tokens (``value_loss_normalizer: token``) or over sequences first
(``sequence``). ``row_weights`` gives each roll-out the weight it has in that average, so the constant is
fitted and scored under the same objective as the value model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from qalign.losses.qsharp import nearest_atom, value_loss

# AUROC at or below this (chance is 0.5) counts as "ranks roll-outs no better than a constant".
UNINFORMATIVE_AUROC = 0.55


def _vector(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1)


# ----------------------------------------------------------------------------- held-out split


def heldout_prompt_indices(num_prompts: int, fraction: float, seed: int) -> list[int]:
    """The prompts kept out of every value-model fit, chosen by hashing (seed, prompt index).

        count = min(n − 1, max(1, round(fraction·n)))   (0 when fraction = 0 or n < 2)

    The prompts with the ``count`` smallest SHA-256 digests of ``"qsharp-holdout:{seed}:{i}"`` are held out.
    The choice depends on nothing else, so every process and every resumed run holds out the same prompts,
    and at least one prompt is always left to train on.

    Returns:
        Sorted prompt indices.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or num_prompts < 2:
        return []
    count = min(num_prompts - 1, max(1, round(fraction * num_prompts)))
    digest = lambda i: hashlib.sha256(f"qsharp-holdout:{seed}:{i}".encode()).digest()
    return sorted(sorted(range(num_prompts), key=digest)[:count])


def row_weights(trained_tokens: Sequence[int], normalizer: str = "token") -> list[float]:
    """Weight of each roll-out in the value loss: w_i = n_i (``token``: every trained token weighs the same)
    or w_i = 1 (``sequence``: each roll-out's mean weighs the same); 0 for a roll-out with no trained token,
    which both normalisers leave out.

    Args:
        trained_tokens: n_i, the positions of roll-out i that the loss trains.
    """
    if normalizer not in ("token", "sequence"):
        raise ValueError(f"normalizer must be 'token' or 'sequence', got {normalizer!r}")
    return [float(n) if normalizer == "token" else float(n > 0) for n in trained_tokens]


def weighted_mean(values: Sequence[float] | torch.Tensor, weights: Sequence[float] | torch.Tensor) -> float:
    """Σ_i w_i v_i / Σ_i w_i (NaN when every weight is 0). Terms with w_i = 0 are skipped, so a
    non-finite value there does not leak in."""
    v, w = _vector(values), _vector(weights)
    keep = w > 0
    if not bool(keep.any()):
        return math.nan
    return float((v[keep] * w[keep]).sum() / w[keep].sum())


# ----------------------------------------------------------------------------- held-out loss vs the best constant


def per_row_value_loss(
    head_output: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    head: str = "bernoulli",
    atoms: torch.Tensor | None = None,
) -> torch.Tensor:
    """The value loss of each roll-out, averaged over its trained positions t:

        L_i = (1/n_i) Σ_t ℓ(r_i, Z_θ(s_t, a_t)),   ℓ = BCE (Bernoulli) or −ln ẑ[idx(r)] (histogram)

    This is the training loss (``qalign.losses.qsharp.value_loss``) of a batch of one roll-out, so the
    held-out number is the same quantity the fit minimised. ``weighted_mean(L, row_weights(n))`` then gives
    the batch loss under either normaliser. Rows with n_i = 0 get 0.

    Args:
        head_output: ``(B, T)`` Bernoulli logits or ``(B, T, A)`` atom logits.
        rewards: ``(B,)`` final rewards; mask: ``(B, T)`` the trained positions.
    Returns:
        ``(B,)``.
    """
    return torch.stack([
        value_loss(head_output[i : i + 1], rewards[i : i + 1], mask[i : i + 1], head, atoms, "token")
        for i in range(head_output.size(0))
    ])  # fmt: skip


def constant_bernoulli_mean(train_rewards: Sequence[float], weights: Sequence[float]) -> float:
    """p̄ = Σ_i w_i r_i / Σ_i w_i: the constant p̂ that minimises the weighted training BCE."""
    return weighted_mean(train_rewards, weights)


def bernoulli_cross_entropy(p: float, rewards: Sequence[float], weights: Sequence[float]) -> float:
    """The weighted BCE of the constant prediction p̂ = p on the labels r_i:

        −Σ_i w_i [r_i ln p + (1 − r_i) ln(1 − p)] / Σ_i w_i

    with 0·ln 0 = 0, so p ∈ {0, 1} is finite on labels that agree with it (and +inf on one that does not).
    With p = p̄ of the training data and the held-out labels this is the constant predictor's held-out BCE;
    on labels whose weighted mean is p itself it is the entropy H(p).
    """
    r, w = _vector(rewards), _vector(weights)
    log_p = math.log(p) if p > 0 else -math.inf
    log_q = math.log1p(-p) if p < 1 else -math.inf
    zero = torch.zeros_like(r)
    terms = -(torch.where(r > 0, r * log_p, zero) + torch.where(r < 1, (1 - r) * log_q, zero))
    return weighted_mean(terms, w)


def constant_bernoulli_loss(
    train_rewards: Sequence[float], train_weights: Sequence[float], heldout_rewards: Sequence[float],
    heldout_weights: Sequence[float],
) -> float:  # fmt: skip
    """Held-out BCE of the best constant fitted on the training data:

    p̄ = Σ_i w_i r_i / Σ_i w_i                                     (training roll-outs i)
    L_const = −Σ_j w_j [r_j ln p̄ + (1 − r_j) ln(1 − p̄)] / Σ_j w_j   (held-out roll-outs j)
    """
    p_bar = constant_bernoulli_mean(train_rewards, train_weights)
    return bernoulli_cross_entropy(p_bar, heldout_rewards, heldout_weights)


def atom_frequencies(rewards: Sequence[float], weights: Sequence[float], atoms: torch.Tensor) -> torch.Tensor:
    """f_a = Σ_i w_i [idx(r_i) = a] / Σ_i w_i: the constant histogram that minimises the weighted training
    MLE loss (idx = nearest atom, as the histogram loss uses).

    Returns:
        ``(A,)`` float64, summing to 1.
    """
    atoms = atoms.to(torch.float64)
    w = _vector(weights)
    index = nearest_atom(_vector(rewards), atoms)
    counts = torch.zeros(atoms.numel(), dtype=torch.float64).index_add_(0, index, w)
    return counts / counts.sum()


def constant_histogram_loss(
    train_rewards: Sequence[float], train_weights: Sequence[float], heldout_rewards: Sequence[float],
    heldout_weights: Sequence[float], atoms: torch.Tensor,
) -> float:  # fmt: skip
    """Held-out cross-entropy of the training-set atom frequencies f (``atom_frequencies``):

        −Σ_j w_j ln f[idx(r_j)] / Σ_j w_j

    +inf when a held-out reward falls on an atom no training reward fell on: the best constant gives that
    atom probability 0. (Then only the AUROC can show an uninformative fit.)
    """
    freq = atom_frequencies(train_rewards, train_weights, atoms)
    index = nearest_atom(_vector(heldout_rewards), atoms.to(torch.float64))
    return weighted_mean(-freq[index].log(), heldout_weights)


def constant_head_output(
    head: str, train_rewards: Sequence[float], weights: Sequence[float], atoms: torch.Tensor | None = None
) -> torch.Tensor:
    """The raw head output of the best constant predictor, for ``guidance_offset``: logit(p̄) for a Bernoulli
    head (p̄ clamped to [1e-12, 1 − 1e-12] so an all-0 or all-1 training set stays finite), ln f for a
    histogram head (−inf on atoms never seen: probability 0).

    Returns:
        ``()`` or ``(A,)`` float64.
    """
    if head == "bernoulli":
        p = min(max(constant_bernoulli_mean(train_rewards, weights), 1e-12), 1 - 1e-12)
        return torch.tensor(math.log(p) - math.log1p(-p), dtype=torch.float64)
    if atoms is None:
        raise ValueError("a histogram head needs its atoms")
    return atom_frequencies(train_rewards, weights, atoms).log()


# ----------------------------------------------------------------------------- ranking


def auroc_labels(rewards: Sequence[float]) -> list[bool]:
    """Which final rewards count as positives for the AUROC: with exactly two distinct rewards (a binary
    verifier) the larger one; otherwise r > median(r) (the mean of the two middle values for even n).
    """
    r = sorted(float(x) for x in rewards)
    if not r:
        return []
    distinct = sorted(set(r))
    if len(distinct) == 2:
        threshold = distinct[0]
    else:
        mid = len(r) // 2
        threshold = r[mid] if len(r) % 2 else (r[mid - 1] + r[mid]) / 2
    return [float(x) > threshold for x in rewards]


def auroc(scores: Sequence[float] | torch.Tensor, labels: Sequence[bool] | torch.Tensor) -> float:
    """Area under the ROC curve in its Mann–Whitney form, ties counted 1/2:

        AUROC = (1 / (n₊ n₋)) Σ_{i: y_i=1} Σ_{j: y_j=0} ([s_i > s_j] + ½ [s_i = s_j])
              = (R₊ − n₊(n₊ + 1)/2) / (n₊ n₋)

    with R₊ the sum of the positives' mid-ranks (tied scores share the mean of their ranks), which gives the
    pairwise sum exactly in O(n log n). NaN when either class is empty. A constant scorer gives exactly 0.5.
    """
    s = _vector(scores)
    y = torch.as_tensor(labels, dtype=torch.bool).reshape(-1)
    if s.numel() != y.numel():
        raise ValueError(f"{s.numel()} scores but {y.numel()} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _values, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    # The tied group starting after `before` scores holds ranks before+1 … before+count: their mean.
    before = counts.cumsum(0) - counts
    mid_rank = before.to(torch.float64) + (counts.to(torch.float64) + 1) / 2
    rank_sum = float(mid_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# ----------------------------------------------------------------------------- KL of a constant value model


def topk_log_mass(ref_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """ln m(s), m(s) = Σ_{a ∈ top-k} π_ref(a|s): the log-mass of π_ref's k most likely tokens (0 when k ≤ 0 or
    k ≥ |V|, i.e. every token is a candidate).

    Args:
        ref_logits: ``(..., V)`` π_ref's logits (already divided by the temperature).
    Returns:
        ``(...)``.
    """
    log_p = ref_logits.log_softmax(dim=-1)
    if not 0 < top_k < ref_logits.size(-1):
        return torch.zeros_like(log_p[..., 0])
    return log_p.topk(top_k, dim=-1).values.logsumexp(dim=-1)


def constant_value_kl(ref_logits: torch.Tensor, relative_offset: float | torch.Tensor, top_k: int) -> torch.Tensor:
    """KL(π_c ‖ π_ref) per state for a value model that gives every candidate the same offset c relative to
    the non-candidates (c = offset − m(s) of ``guided_logits``; 0 under the ``candidate_min`` rule):

        π_c(a|s) = π_ref(a|s) e^c / Z on the top-k, π_ref(a|s) / Z elsewhere,   Z = m e^c + 1 − m
        KL = q·c − ln Z,   q = m e^c / Z (the top-k's guided mass)

    since ln(π_c/π_ref) is c − ln Z on the top-k and −ln Z off it. It grows with c ≥ 0 (dKL/dc = c·q(1 − q))
    from 0 at c = 0 to ``topk_truncation_kl`` = −ln m as c → ∞.

    Args:
        ref_logits: ``(..., V)`` π_ref's logits (already divided by the temperature).
        relative_offset: c, a number or a tensor broadcasting to ``(...)``.
    Returns:
        ``(...)``.
    """
    log_m = topk_log_mass(ref_logits, top_k)
    c = torch.as_tensor(relative_offset, dtype=log_m.dtype, device=log_m.device).expand_as(log_m)
    # ln(1 − m), −inf when the top-k hold all the mass (then π_c = π_ref restricted = π_ref, KL = 0).
    log_rest = torch.log1p(-log_m.exp().clamp(max=1.0))
    log_z = torch.logaddexp(log_m + c, log_rest)
    q = (log_m + c - log_z).exp()
    # KL ≥ 0; at c = 0 the two terms cancel to a rounding error of either sign.
    return (q * c - log_z).clamp(min=0.0)


def topk_truncation_kl(ref_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """−ln m(s): KL(π_ref restricted to its top-k and renormalised ‖ π_ref), the KL that top-k truncation
    alone produces: the limit c → ∞ of ``constant_value_kl``, which falls short of it by ≈ (c + 1)·ε,
    ε = e^{−c}(1 − m)/m. (Offsets relative to z_min at η = 0.1 and p̄ = 0.34 give c ≈ 8.9, so
    ε ≈ 1.3e-4·(1 − m)/m.)

    Returns:
        ``(...)``.
    """
    return -topk_log_mass(ref_logits, top_k)


# ----------------------------------------------------------------------------- verdict


def value_model_uninformative(heldout_loss: float, constant_loss: float, auroc_value: float) -> bool:
    """True when the fit is no better than the constant predictor: held-out loss ≥ the constant's, or
    AUROC ≤ ``UNINFORMATIVE_AUROC``. A NaN (no held-out rows, or one reward class only) decides nothing."""
    worse_loss = not math.isnan(heldout_loss) and not math.isnan(constant_loss) and heldout_loss >= constant_loss
    chance_ranking = not math.isnan(auroc_value) and auroc_value <= UNINFORMATIVE_AUROC
    return worse_loss or chance_ranking
