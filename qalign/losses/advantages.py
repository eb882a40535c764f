"""Group-relative advantages: QAE's K-quantile baseline (Wu et al., arXiv 2509.22611)."""

from __future__ import annotations

import math
from typing import Literal

import torch

Interpolation = Literal["paper", "torch_linear"]

# ceil(K·G) must not round an integer K·G up when K carries float error: float32's 0.6 times 5 is
# 3.0000001, which would pick the 4th value instead of the 3rd. Subtract a tolerance first.
_CEIL_TOLERANCE = 1e-6


def quantile_baseline(
    grouped_rewards: torch.Tensor, quantile_k: float, interpolation: Interpolation = "paper"
) -> torch.Tensor:
    """The K-quantile of each row of ``grouped_rewards`` (shape ``(num_groups, G)``) → ``(num_groups,)``.

    ``"paper"`` is the right-continuous quantile of the empirical CDF (paper Eq. 3):
    b_K = inf{x : F(x) ≥ K} = R_sorted[ceil(K·G) − 1]. ``"torch_linear"`` is ``torch.quantile``'s
    linear interpolation, as the official verl code computes it. NaN entries (unscorable
    completions) are left out of their group; a group with no finite entry gets NaN.
    For K outside (0, 1) the official code falls back to the group mean; so does this.
    """
    if grouped_rewards.dim() != 2:
        raise ValueError(f"grouped_rewards must be (num_groups, G), got shape {tuple(grouped_rewards.shape)}")
    if not 0.0 < quantile_k < 1.0:
        return torch.nanmean(grouped_rewards, dim=1)
    if interpolation == "torch_linear":
        return torch.nanquantile(grouped_rewards, quantile_k, dim=1, interpolation="linear")
    if interpolation != "paper":
        raise ValueError(f"quantile interpolation must be 'paper' or 'torch_linear', got {interpolation!r}")
    # torch.sort puts NaN last, so the first `count` sorted entries are the finite rewards.
    sorted_rewards, _ = torch.sort(grouped_rewards, dim=1)
    count = (~torch.isnan(grouped_rewards)).sum(dim=1)
    index = torch.tensor(
        [max(math.ceil(quantile_k * int(c) - _CEIL_TOLERANCE) - 1, 0) for c in count.tolist()],
        device=grouped_rewards.device,
    )
    baseline = sorted_rewards.gather(1, index.unsqueeze(1)).squeeze(1)
    return baseline.masked_fill(count == 0, float("nan"))


def quantile_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    quantile_k: float = 0.4,
    scale_rewards: bool | str = True,
    interpolation: Interpolation = "paper",
    epsilon: float = 1e-4,
) -> torch.Tensor:
    """QAE advantages Â_i = (R_i − b_K(q)) / (std_j R_j + ε), broadcast per completion.

    Args:
        rewards: flat ``(num_groups · G,)`` tensor; consecutive blocks of ``num_generations`` are
            the completions of one prompt, the order TRL's GRPOTrainer uses. NaN marks an
            unscorable completion: it is left out of its group's statistics and gets advantage 0.
        num_generations: G, the group size.
        quantile_k: K ∈ (0, 1); 0.4 is the paper's default. Outside (0, 1) the mean is used (GRPO).
        scale_rewards: ``True``/``"group"`` divides by the group's std (unbiased, as TRL), ``"batch"``
            by the std of the whole batch, ``False``/``"none"`` not at all (Dr. GRPO style).
        interpolation: ``"paper"`` (right-continuous) or ``"torch_linear"`` (official runs).
        epsilon: added to the std; TRL's value, so a QAE run differs from GRPO only in the baseline.

    Returns:
        ``(num_groups · G,)`` advantages.
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must be a flat tensor whose length is a multiple of num_generations={num_generations}, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, num_generations)
    baseline = quantile_baseline(grouped, quantile_k, interpolation)
    advantages = grouped - baseline.unsqueeze(1)
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if mode == "group":
        advantages = advantages / (_nanstd(grouped, dim=1).unsqueeze(1) + epsilon)
    elif mode == "batch":
        advantages = advantages / (_nanstd(rewards, dim=0) + epsilon)
    elif mode != "none":
        raise ValueError(f"scale_rewards must be True/False or 'group'/'batch'/'none', got {scale_rewards!r}")
    return torch.nan_to_num(advantages, nan=0.0).reshape(-1)


def _nanstd(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Unbiased std ignoring NaN (as TRL's ``nanstd``); 0 where fewer than two finite values."""
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    squared = torch.nansum((values - mean) ** 2, dim=dim, keepdim=True)
    variance = squared / (count - 1).clamp(min=1)
    return variance.sqrt().squeeze(dim)
