"""The SFT anchor: negative log-likelihood of the data's successful samples, added beside a Bellman loss.

The offline Bellman losses move probability off the sampled sequences (every failure is pushed down by
up to ln E[exp(r/β)] nats in all) and nothing says where it should go; on the comparison's validation
split it went to states the data never reaches (repetition loops, π_ref's long answers; docs/compare.md).
RFT, which only raises its correct samples, moved the other way. The anchor adds RFT's term:

    L = L_Bellman + λ · E_{y: R(y) > τ} [ −(1/|y|) Σ_t ln π_θ(a_t | s_t) ]

with the mean taken over the batch's successful sequences (none in a batch → 0). This is qalign's
choice, not the ShiQ or DQO papers'; λ = 0 (the default) leaves each method exactly as published.
"""

from __future__ import annotations

import torch


def success_nll(
    policy_logprobs: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor, threshold: float = 0.0
) -> torch.Tensor:
    """Mean over the sequences whose summed reward exceeds ``threshold`` of their mean action-token NLL.

    Args:
        policy_logprobs: ``(B, T)`` ln π_θ(a_t | s_t) (differentiable).
        rewards: ``(B, T)`` per-token rewards; a sequence's reward is their sum.
        action_mask: ``(B, T)``, 1 on the policy's actions.
        threshold: τ; a sequence counts when its reward is > τ.

    Returns:
        A scalar; 0 (still differentiable) when no sequence in the batch succeeded.
    """
    mask = action_mask.to(policy_logprobs.dtype)
    success = (rewards.sum(dim=1) > threshold).to(policy_logprobs.dtype)
    lengths = mask.sum(dim=1).clamp(min=1.0)
    per_sequence = -(policy_logprobs * mask).sum(dim=1) / lengths
    return (per_sequence * success).sum() / success.sum().clamp(min=1.0)
