"""The gathered reward matrix of the GRPO family's latest scoring call, kept for the hooks that follow.

TRL's ``_generate_and_score_completions`` computes the rewards of every process's completions (gathered)
and turns them into advantages inline, handing back only this process's slice. QAE (its own baseline),
ShiQ online (token rewards) and DAPO's dynamic sampling (which groups have signal) each need the whole
matrix again; ``GatheredRewardsMixin`` keeps it, so TRL's hook is not copied to get at it.
"""

from __future__ import annotations

import torch


class GatheredRewardsMixin:
    """Keeps ``_calculate_rewards``' result as ``self._gathered_rewards_per_func``: shape (completions of
    all processes, reward functions), NaN where a function did not score. It is overwritten on every
    scoring call, so a hook reads the rewards of the batch it is handling."""

    _gathered_rewards_per_func: torch.Tensor | None = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gathered_rewards_per_func = rewards_per_func
        return rewards_per_func


def summed_rewards(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor) -> torch.Tensor:
    """Σ_f w_f · r_f per completion, skipping the functions that did not score it (NaN) — TRL's
    ``sum_then_normalize`` reward. A completion no function scored is NaN, not 0, so that a caller
    decides what "unscorable" means (QAE leaves it out of the baseline, ShiQ counts it as 0).

    Args:
        rewards_per_func: ``(N, F)`` rewards, NaN where function f did not score completion n.
        reward_weights: ``(F,)`` weights w_f.

    Returns:
        ``(N,)`` weighted sums.
    """
    total = (rewards_per_func * reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards_per_func).all(dim=1), torch.nan)
