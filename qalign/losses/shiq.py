"""ShiQ: the LLM's logits as a shifted soft Q-function (Clavier et al., "ShiQ: Bringing back Bellman
to LLMs", arXiv 2505.11081, NeurIPS 2025).

Token-level MDP: state s_t = (x, y_<t), action a_t = y_t, reward r_t. The logits are
parameterised as ℓ_θ(s,a) = ℓ_ref(s,a) + Q(s,a)/β, so softmax(ℓ_θ) is the KL-regularised optimum once
Q = Q*, with no value head and no target network. Every function here is pure and works on per-token
tensors of shape ``(B, T)`` aligned with the completion (position t holds the action a_t and the
statistics of the state s_t that produced it).

Multi-turn: ``action_mask`` is 1 on tokens the policy produced and 0 on tokens it did not (tool output,
user turns). Masked tokens are part of the state (they stay in the context, so the model sees them)
but are not actions: they get no residual, they do not advance the discount clock, and a reward that
sits on one is credited to the policy action before it (``fold_rewards``).

The scans below (``soft_returns_to_go``, ``next_action_values``, ``fold_rewards``) are shared by DQO.
"""

from __future__ import annotations

from typing import Literal

import torch

Normalizer = Literal["sequence", "token", "constant"]
ShiQResidual = Literal["multi_step", "one_step"]


# ----------------------------------------------------------------------------- token-MDP scans


def fold_rewards(rewards: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Move every reward that sits on a non-action token onto the closest policy action before it.

    A reward observed during an environment segment (e.g. the tool result of a function call) is the
    consequence of the action that ended the policy's turn. Rewards before the first action have no
    action to credit and are dropped. Padding must therefore carry reward 0 (the collator pads with 0).

    Args:
        rewards: ``(B, T)`` per-token rewards r_t.
        action_mask: ``(B, T)``, 1 where the token is a policy action.

    Returns:
        ``(B, T)`` rewards, zero on every non-action token.
    """
    mask = action_mask.bool()
    folded = torch.zeros_like(rewards)
    pending = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.size(1) - 1, -1, -1):
        folded[:, t] = torch.where(mask[:, t], rewards[:, t] + pending, torch.zeros_like(pending))
        pending = torch.where(mask[:, t], torch.zeros_like(pending), pending + rewards[:, t])
    return folded


def next_action_values(values: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """``out_t`` = ``values`` at the first action position after t, or 0 if t is the last action.

    With deterministic token transitions this is "the value of the next decision state" s_{t+1}
    (skipping the environment's tokens); 0 after the last action is the terminal value V(s_{T+1}) = 0.
    Differentiable in ``values``.

    Args:
        values: ``(B, T)`` per-state quantities (e.g. ΔV(s_t), V_φ(s_t), G^λ(s_t)).
        action_mask: ``(B, T)``.

    Returns:
        ``(B, T)``.
    """
    mask = action_mask.bool()
    out = []
    carry = torch.zeros_like(values[:, 0])
    for t in range(values.size(1) - 1, -1, -1):
        out.append(carry)
        carry = torch.where(mask[:, t], values[:, t], carry)
    return torch.stack(out[::-1], dim=1)


def soft_returns_to_go(soft_reward: torch.Tensor, action_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted reverse cumulative sum over policy actions: out_t = Σ_{k ≥ t} γ^{n(t,k)} c_k.

    n(t, k) counts the policy actions in [t, k): environment tokens neither add a term nor discount.
    O(T) and differentiable in ``soft_reward``.

    Args:
        soft_reward: ``(B, T)`` per-action terms c_k (e.g. r_k − β ln ρ_k).
        action_mask: ``(B, T)``.
        gamma: discount γ.

    Returns:
        ``(B, T)``; at a non-action position, the return from the next action on.
    """
    mask = action_mask.bool()
    out = []
    running = torch.zeros_like(soft_reward[:, 0])
    for t in range(soft_reward.size(1) - 1, -1, -1):
        running = torch.where(mask[:, t], soft_reward[:, t] + gamma * running, running)
        out.append(running)
    return torch.stack(out[::-1], dim=1)


def masked_aggregate(
    values: torch.Tensor, action_mask: torch.Tensor, normalizer: Normalizer = "sequence", max_length: int | None = None
) -> torch.Tensor:
    """Reduce per-token losses ``(B, T)`` to a scalar over the action tokens.

    ``"sequence"``: mean over each sequence's actions, then over sequences (E_D (1/T) Σ_t, the form of
    the derived loss in docs/shiq_dqo.md). ``"token"``: mean over every action token in the batch (long sequences weigh more).
    ``"constant"``: sum divided by B · ``max_length`` (default: T), independent of lengths (Dr. GRPO style).
    Sequences without any action count as zero under "sequence" and are left out of its mean.
    """
    mask = action_mask.to(values.dtype)
    masked = values * mask
    if normalizer == "token":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if normalizer == "sequence":
        lengths = mask.sum(dim=1)
        per_sequence = masked.sum(dim=1) / lengths.clamp(min=1.0)
        return per_sequence.sum() / (lengths > 0).sum().clamp(min=1)
    if normalizer == "constant":
        return masked.sum() / (values.size(0) * (max_length or values.size(1)))
    raise ValueError(f"normalizer must be 'sequence', 'token' or 'constant', got {normalizer!r}")


# ----------------------------------------------------------------------------- ShiQ


def shiq_one_step_residuals(
    policy_logprobs: torch.Tensor,
    policy_lse: torch.Tensor,
    ref_logprobs: torch.Tensor,
    ref_lse: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    beta: float,
    gamma: float = 1.0,
    stop_gradient_target: bool = False,
) -> torch.Tensor:
    """One-step ShiQ Bellman residual (derived from the paper's design; docs/shiq_dqo.md):

        δ_t = β Δℓ(s_t, a_t) − r_t − γ β ΔV(s_{t+1}),

    with Δℓ = ℓ_θ − ℓ_ref (raw logits of the taken token) and ΔV(s) = LSE_θ(s) − LSE_ref(s), ΔV = 0 after
    the last action. Δℓ is formed as ln ρ + ΔV from log-probabilities and log-sum-exps (ln π = ℓ − LSE),
    so a policy equal to the reference gives exactly zero, with no float cancellation error.

    Args:
        policy_logprobs: ``(B, T)`` ln π_θ(a_t | s_t) = ℓ_θ(s_t, a_t) − LSE_θ(s_t) (differentiable).
        policy_lse: ``(B, T)`` LSE_θ(s_t) over the full vocabulary (differentiable).
        ref_logprobs: ``(B, T)`` ln π_ref(a_t | s_t), precomputed.
        ref_lse: ``(B, T)`` LSE_ref(s_t), precomputed.
        rewards: ``(B, T)`` r_t (a sequence reward sits on the last action).
        action_mask: ``(B, T)`` 1 on policy actions.
        beta: KL weight β > 0.
        gamma: discount γ.
        stop_gradient_target: detach the bootstrapped target r_t + γβΔV(s_{t+1}) (semi-gradient, as
            Q-learning without a target network); by default the residual is minimised in both
            terms (residual gradient).

    Returns:
        ``(B, T)`` residuals δ_t, zero on non-action positions.
    """
    mask = action_mask.bool()
    log_ratio = policy_logprobs - ref_logprobs  # ln ρ_t
    delta_v = policy_lse - ref_lse  # ΔV(s_t), in units of 1/β
    delta_logits = log_ratio + delta_v  # Δℓ(s_t, a_t) = ln ρ_t + ΔV(s_t)
    rewards = fold_rewards(rewards, mask)
    target = rewards + gamma * beta * next_action_values(delta_v, mask)  # r_t + γβΔV(s_{t+1})
    if stop_gradient_target:
        target = target.detach()
    return torch.where(mask, beta * delta_logits - target, torch.zeros_like(target))


def shiq_multi_step_residuals(
    policy_logprobs: torch.Tensor,
    policy_lse: torch.Tensor,
    ref_logprobs: torch.Tensor,
    ref_lse: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    beta: float,
    gamma: float = 1.0,
    stop_gradient_target: bool = False,
) -> torch.Tensor:
    """Multi-step ShiQ residual, the path-consistency form for sparse rewards (derived; docs/shiq_dqo.md):

        ε_t = Σ_{k≥t} γ^{k−t} [ r_k − β ln ρ_k ] − β ΔV(s_t).

    Computed in its Q-form, which is the same function (the k = t term's β ΔV(s_t) cancels):

        −ε_t = β Δℓ(s_t, a_t) − r_t − γ Σ_{k>t} γ^{k−t−1} soft_reward_k,
        soft_reward_k = r_k − β ln ρ_k.

    The sign is flipped relative to ε_t so that both ShiQ residuals read "prediction − target"; the loss
    squares it. At ℓ_θ = ℓ_ref + Q*/β every residual is zero on any trajectory, whatever policy sampled it.

    Args:
        policy_logprobs, policy_lse, ref_logprobs, ref_lse, rewards, action_mask: as in
            ``shiq_one_step_residuals``, all ``(B, T)``.
        beta: β > 0.
        gamma: γ.
        stop_gradient_target: detach the target r_t + γ·(soft return from s_{t+1}); the gradient then
            reaches only the logit of the taken token, Δℓ(s_t, a_t). Default: full gradient (as PCL).

    Returns:
        ``(B, T)`` residuals −ε_t, zero on non-action positions.
    """
    mask = action_mask.bool()
    log_ratio = policy_logprobs - ref_logprobs  # ln ρ_k
    delta_logits = log_ratio + (policy_lse - ref_lse)  # Δℓ(s_t, a_t)
    rewards = fold_rewards(rewards, mask)
    soft_reward = rewards - beta * log_ratio  # r_k − β ln ρ_k
    # Σ_{k>t} γ^{k−t−1} soft_reward_k: the soft return from the next decision state s_{t+1}
    tail = next_action_values(soft_returns_to_go(soft_reward, mask, gamma), mask)
    target = rewards + gamma * tail
    if stop_gradient_target:
        target = target.detach()
    return torch.where(mask, beta * delta_logits - target, torch.zeros_like(target))


def shiq_loss(
    policy_logprobs: torch.Tensor,
    policy_lse: torch.Tensor,
    ref_logprobs: torch.Tensor,
    ref_lse: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    beta: float,
    gamma: float = 1.0,
    residual: ShiQResidual = "multi_step",
    stop_gradient_target: bool = False,
    normalizer: Normalizer = "sequence",
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ShiQ loss L(θ) = E_D [ norm Σ_t residual_t² ] over the policy actions.

    ``residual="multi_step"`` (default) is L_ShiQ with ε_t; ``"one_step"`` is L_1step with δ_t. See
    ``masked_aggregate`` for ``normalizer``. All tensors ``(B, T)``.

    Returns:
        (scalar loss, ``(B, T)`` residuals).
    """
    fn = {"multi_step": shiq_multi_step_residuals, "one_step": shiq_one_step_residuals}.get(residual)
    if fn is None:
        raise ValueError(f"residual must be 'multi_step' or 'one_step', got {residual!r}")
    # β > 0 is checked once, where the trainer's config is built (qalign.trainers.offline.check_token_loss_args).
    residuals = fn(
        policy_logprobs, policy_lse, ref_logprobs, ref_lse, rewards, action_mask, beta, gamma, stop_gradient_target
    )
    return masked_aggregate(residuals.square(), action_mask, normalizer, max_length), residuals
