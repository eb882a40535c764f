"""Q-probe losses and the best-of-k inference rule (Li et al., "Q-Probe: A Lightweight Approach to
Reward Maximization for Language Models", ICML 2024, arXiv 2402.14688; docs/qprobe.md).

The LM is frozen. A probe Q_θ(x, a) scores the embedding φ(x, a) of a prompt x and a completion
a ~ p0(·|x). At inference, π_{θ,k} draws a_1..a_k ~ p0 and picks a_i with probability
softmax_i(Q_θ(x, a_i)/β) (β = 0: argmax). Every function here is pure and works on probe outputs
``q`` that are already computed; chunked tensors have shape ``(C, k)``: C chunks, each holding k
samples of ONE prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def best_of_k_weights(q: torch.Tensor, beta: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The selection probabilities of π_{θ,k}: w_j = softmax_j(Q_θ(x, a_j) / β) within each chunk.

    β = 0 is the limit β → 0: a one-hot on the argmax (the first one on ties, as ``argmax`` does).

    Args:
        q: ``(C, k)`` probe values Q_θ(x, a_j) of the k samples of each chunk.
        beta: selection temperature β ≥ 0.
        mask: optional ``(C, k)`` bool, False on padding slots (chunks shorter than k); they get weight 0.

    Returns:
        ``(C, k)`` weights, each row summing to 1.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if mask is not None:
        q = q.masked_fill(~mask, float("-inf"))
    if beta == 0:
        dtype = q.dtype if q.is_floating_point() else torch.float32
        return F.one_hot(q.argmax(dim=-1), q.size(-1)).to(dtype)
    return torch.softmax(q / beta, dim=-1)


def expected_best_of_k_reward(
    q: torch.Tensor, r: torch.Tensor, beta: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact expected reward of π_{θ,k} on each chunk: E[r] = Σ_j softmax_j(Q_θ/β) · r_j.

    This is the evaluation of the reference code (``shortcut_eval_probe``): no sampling noise from the
    final pick, only from which k samples share a chunk. With ``q = r`` and β = 0 it is the oracle
    best-of-k (max_j r_j); with constant ``q`` and β > 0 it is the mean reward of p0.

    Args:
        q: ``(C, k)`` probe values. r: ``(C, k)`` rewards. mask: optional ``(C, k)`` bool of real slots.

    Returns:
        ``(C,)`` expected reward per chunk.
    """
    weights = best_of_k_weights(q, beta, mask)
    r = r if mask is None else r.masked_fill(~mask, 0.0)
    return (weights * r).sum(dim=-1)


def qprobe_mse_loss(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Reward-model loss (paper Eq. 2): L_Q = E[(Q_θ(x, a) − r(x, a))²].

    Args:
        q: ``(N,)`` probe values. r: ``(N,)`` rewards.

    Returns:
        scalar loss.
    """
    return ((q - r) ** 2).mean()


def qprobe_ce_loss(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on the probe's logit (paper Eq. 3):
    L_CE = −E[r log σ(Q_θ) + (1 − r) log(1 − σ(Q_θ))].

    Computed on the logit (log-sigmoid) for stability; rewards in [0, 1] are allowed (soft labels).

    Args:
        q: ``(N,)`` probe values (logits). r: ``(N,)`` rewards in [0, 1].

    Returns:
        scalar loss.
    """
    return F.binary_cross_entropy_with_logits(q, r.to(q.dtype))


def qprobe_pg_loss(
    q: torch.Tensor,
    r: torch.Tensor,
    beta: float = 1.0,
    baseline: float | torch.Tensor = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance-weighted policy gradient (paper Eq. 5), in the chunked form of the reference code.

    With f(a) = exp(Q_θ(x, a)/β), the weight of sample j of a chunk is
    ρ_θ(a_j, {a_i}_{i≠j}) = f(a_j) / Σ_i f(a_i) = softmax_j(Q_θ/β), and

        L_PG = −(1/C) Σ_c Σ_j (r_cj − b) · ρ_θ(a_cj),

    i.e. minus the expected (baselined) reward of π_{θ,k} over the chunk (k = chunk size).
    Because Σ_j ρ_θ = 1 within a chunk, a baseline b that is constant within a chunk only shifts the
    loss by −b: its gradient is exactly zero (the reference code's baseline is a no-op for learning).
    It is kept so the loss value reads as "expected advantage".

    Args:
        q: ``(C, k)`` probe values; every row is k samples of one prompt.
        r: ``(C, k)`` rewards.
        beta: training temperature β > 0 (the reference uses 1: the probe's scale absorbs β).
        baseline: b, a scalar or ``(C, 1)`` per-chunk value.
        mask: optional ``(C, k)`` bool of real slots (ragged chunks).

    Returns:
        scalar loss.
    """
    if beta <= 0:
        raise ValueError(f"the PG loss needs beta > 0 (a softmax), got {beta}")
    rho = best_of_k_weights(q, beta, mask)  # ρ_θ: softmax over the chunk
    advantage = r - baseline
    if mask is not None:
        advantage = advantage.masked_fill(~mask, 0.0)
    return -(rho * advantage).sum(dim=-1).mean()


def qprobe_bt_loss(q_chosen: torch.Tensor, q_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry preference loss (paper Eqs. 6–7): L_QP = E[−log σ(Q_θ(x, a_w) − Q_θ(x, a_l))].

    Args:
        q_chosen: ``(P,)`` probe values of the preferred completions a_w.
        q_rejected: ``(P,)`` probe values of the other completion a_l of the same prompt.

    Returns:
        scalar loss.
    """
    return -F.logsigmoid(q_chosen - q_rejected).mean()


QPROBE_LOSSES = ("mse", "ce", "pg", "bt")
