"""DQO: Direct Q-function Optimization (Ji, Liu et al., "Enhancing Multi-Step Reasoning Abilities of
Language Models through Direct Q-Function Optimization", arXiv 2410.09302 v2).

Soft actor-critic in the token MDP with the Q-function parameterised by the language model and a
separately parameterised state value (derived from the paper's design; docs/shiq_dqo.md):

    Q_{θ,φ}(s, a) = β ln ρ_θ(a | s) + V_φ(s),   ρ_θ = π_θ / π_ref.

At the optimum β ln(π*/π_ref) = Q* − V*, so (π_θ, V_φ) = (π*, V*) zeroes both losses on every
trajectory. Inputs are per-token ``(B, T)`` tensors aligned with the completion; ``action_mask`` marks
policy tokens (non-action tokens stay in the state but are skipped, see ``qalign.losses.shiq``).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from qalign.losses.shiq import Normalizer, fold_rewards, masked_aggregate, next_action_values

ImportanceSampling = Literal["none", "token", "cumulative"]


def dqo_soft_rewards(
    rewards: torch.Tensor, policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, beta: float
) -> torch.Tensor:
    """soft_reward_k = r_k − β ln ρ_θ(a_k | s_k) = r_k + β ln(π_ref / π_θ)(a_k | s_k); all ``(B, T)``."""
    return rewards - beta * (policy_logprobs - ref_logprobs)


def lambda_returns(
    soft_reward: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """The λ-return of the soft reward, computed backwards over the policy actions:

        G^λ(s_h) = soft_reward_h + γ [ (1 − λ) V(s_{h+1}) + λ G^λ(s_{h+1}) ],   G^λ(s_{T+1}) = V(s_{T+1}) = 0.

    λ = 1 is the Monte-Carlo soft return Σ_{k≥h} γ^{k−h} soft_reward_k; λ = 0 is the one-step target
    soft_reward_h + γ V(s_{h+1}). s_{h+1} is the next decision state (environment tokens skipped).

    Args:
        soft_reward: ``(B, T)``.
        values: ``(B, T)`` V(s_h) at each position.
        action_mask: ``(B, T)``.
        gamma: γ.
        lam: λ ∈ [0, 1].

    Returns:
        ``(B, T)`` G^λ(s_h); at a non-action position, the λ-return of the next action.
    """
    mask = action_mask.bool()
    out = []
    lambda_return = torch.zeros_like(soft_reward[:, 0])
    next_value = torch.zeros_like(soft_reward[:, 0])
    for t in range(soft_reward.size(1) - 1, -1, -1):
        candidate = soft_reward[:, t] + gamma * ((1.0 - lam) * next_value + lam * lambda_return)
        lambda_return = torch.where(mask[:, t], candidate, lambda_return)
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        out.append(lambda_return)
    return torch.stack(out[::-1], dim=1)


@torch.no_grad()
def importance_weights(
    policy_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    action_mask: torch.Tensor,
    mode: ImportanceSampling = "cumulative",
    clip: float = 1.0,
) -> torch.Tensor:
    """Detached, clipped importance weights w_h of π_θ against the behaviour policy π_b that sampled the data.

    ``"token"``: w_h = min(c, π_θ(a_h|s_h) / π_b(a_h|s_h)).
    ``"cumulative"``: w_h = min(c, Π_{k≤h} π_θ(a_k|s_k) / π_b(a_k|s_k)), the ratio of the prefix
    probabilities, which reweights the data's state-action distribution towards π_θ's.
    ``"none"``: w_h = 1. Non-action positions get 0.

    Args:
        policy_logprobs: ``(B, T)`` ln π_θ(a_h|s_h).
        behavior_logprobs: ``(B, T)`` ln π_b(a_h|s_h), the sampler's log-probs.
        action_mask: ``(B, T)``.
        mode: see above.
        clip: c > 0.

    Returns:
        ``(B, T)`` weights in [0, c].
    """
    mask = action_mask.bool()
    if mode == "none":
        return mask.to(policy_logprobs.dtype)
    log_ratio = torch.where(mask, policy_logprobs - behavior_logprobs, torch.zeros_like(policy_logprobs))
    if mode == "cumulative":
        log_ratio = log_ratio.cumsum(dim=1)
    elif mode != "token":
        raise ValueError(f"importance_sampling must be 'none', 'token' or 'cumulative', got {mode!r}")
    # Clip in log space: a long prefix's ratio can overflow exp() long before the min.
    weights = log_ratio.clamp(max=math.log(clip)).exp()
    return weights * mask.to(weights.dtype)


class DQOLosses(NamedTuple):
    policy_loss: torch.Tensor  # scalar, gradient to θ only
    value_loss: torch.Tensor  # scalar, gradient to φ only
    lambda_return: torch.Tensor  # (B, T) G^λ(s_h), detached
    weights: torch.Tensor  # (B, T) w_h, detached
    policy_residuals: torch.Tensor  # (B, T)
    value_residuals: torch.Tensor  # (B, T)


def dqo_losses(
    policy_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    beta: float,
    gamma: float = 1.0,
    lam: float = 1.0,
    behavior_logprobs: torch.Tensor | None = None,
    importance_sampling: ImportanceSampling = "none",
    is_clip: float = 1.0,
    normalizer: Normalizer = "sequence",
    max_length: int | None = None,
) -> DQOLosses:
    """DQO's value and policy losses (derived; docs/shiq_dqo.md), with the stop-gradients as written there:

        soft_reward_k = r_k − β ln ρ_θ(a_k|s_k)                                  (θ detached)
        G^λ(s_h)      = soft_reward_h + γ[(1−λ) V_φ(s_{h+1}) + λ G^λ(s_{h+1})]     (θ, φ detached)
        L_V(φ) = E Σ_h w_h ( V_φ(s_h) − sg[G^λ(s_h)] )²
        L_π(θ) = E Σ_h w_h ( β ln ρ_θ(a_h|s_h) + sg[V_φ(s_h)] − r_h − γ sg[G^λ(s_{h+1})] )²

    For λ = 1, L_π is the ShiQ multi-step residual with a separate V and stop-gradients. Σ_h is
    reduced by ``normalizer`` (see ``masked_aggregate``).

    Args:
        policy_logprobs: ``(B, T)`` ln π_θ(a_h|s_h) (differentiable in θ).
        ref_logprobs: ``(B, T)`` ln π_ref(a_h|s_h), precomputed.
        values: ``(B, T)`` V_φ(s_h) (differentiable in φ).
        rewards: ``(B, T)`` r_h.
        action_mask: ``(B, T)``.
        beta: β > 0.
        gamma: γ.
        lam: λ of the λ-return.
        behavior_logprobs: ``(B, T)`` ln π_b(a_h|s_h) of the sampler; default: the reference (data
            sampled from π_ref at temperature 1).
        importance_sampling: ``"none"``, ``"token"`` or ``"cumulative"`` (see ``importance_weights``).
        is_clip: c of the weight clip.

    Returns:
        ``DQOLosses``.
    """
    # β > 0 is checked once, where the trainer's config is built (qalign.trainers.offline.check_token_loss_args).
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    mask = action_mask.bool()
    rewards = fold_rewards(rewards, mask)
    log_ratio = policy_logprobs - ref_logprobs  # ln ρ_θ
    soft_reward = dqo_soft_rewards(rewards, policy_logprobs.detach(), ref_logprobs, beta)
    lambda_return = lambda_returns(soft_reward, values.detach(), mask, gamma, lam)
    behavior = ref_logprobs if behavior_logprobs is None else behavior_logprobs
    weights = importance_weights(policy_logprobs.detach(), behavior, mask, importance_sampling, is_clip)

    zero = torch.zeros_like(values)
    value_residuals = torch.where(mask, values - lambda_return, zero)  # V_φ(s_h) − sg[G^λ(s_h)]
    next_return = next_action_values(lambda_return, mask)  # sg[G^λ(s_{h+1})], 0 after the last action
    q_target = rewards + gamma * next_return
    policy_residuals = torch.where(mask, beta * log_ratio + values.detach() - q_target, zero)

    value_loss = masked_aggregate(weights * value_residuals.square(), mask, normalizer, max_length)
    policy_loss = masked_aggregate(weights * policy_residuals.square(), mask, normalizer, max_length)
    return DQOLosses(policy_loss, value_loss, lambda_return, weights, policy_residuals, value_residuals)
