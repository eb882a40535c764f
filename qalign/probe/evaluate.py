"""Exact expected reward of π_{θ,k} on cached samples, for several k (reference: ``shortcut_eval_probe``).

Per prompt with n cached samples: shuffle them, cut them into ⌊n/k⌋ chunks of k, and average over
chunks the exact expectation Σ_j softmax_j(Q/β)·r_j (β = 0: the argmax's reward). Repeating over
``shuffles`` random shufflings averages over which samples share a chunk (and breaks argmax ties at
random). Prompts count equally.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from qalign.losses.qprobe import expected_best_of_k_reward
from qalign.probe.train import ProbeData


def best_of_k_curve(
    q: torch.Tensor,
    rewards: torch.Tensor,
    groups: torch.Tensor,
    ks: Sequence[int],
    beta: float = 0.0,
    shuffles: int = 10,
    seed: int = 0,
) -> dict[int, float]:
    """Mean over prompts of E[r] under π_{θ,k}, for each k in ``ks``.

    Args:
        q: ``(N,)`` scores Q_θ(x, a) (``q = rewards`` with β = 0 gives the oracle best-of-k).
        rewards: ``(N,)``. groups: ``(N,)`` prompt index of each sample.
        ks: each k must be at most the smallest number of samples of a prompt.

    Returns:
        {k: expected reward}.
    """
    return {k: values.mean().item() for k, values in _best_of_k(q, rewards, groups, ks, beta, shuffles, seed).items()}


def best_of_k_per_prompt(
    q: torch.Tensor,
    rewards: torch.Tensor,
    groups: torch.Tensor,
    ks: Sequence[int],
    beta: float = 0.0,
    shuffles: int = 10,
    seed: int = 0,
) -> dict[int, list[float]]:
    """E[r] under π_{θ,k} for each prompt (by increasing group id), for each k: the numbers whose mean
    ``best_of_k_curve`` reports (same shuffles), for paired comparisons over prompts."""
    prompts = ProbeData(q.detach().reshape(-1, 1), rewards, groups).prompt_indices()
    order = _size_order(prompts)
    out = {}
    for k, values in _best_of_k(q, rewards, groups, ks, beta, shuffles, seed).items():
        by_prompt = torch.empty_like(values)
        by_prompt[torch.tensor(order, dtype=torch.long)] = values
        out[k] = by_prompt.tolist()
    return out


def _size_order(prompts: list[torch.Tensor]) -> list[int]:
    """Prompt positions in the order ``_best_of_k`` visits them: by number of samples, then by position."""
    return sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))


def _best_of_k(q, rewards, groups, ks, beta, shuffles, seed) -> dict[int, torch.Tensor]:
    """Per prompt E[r] under π_{θ,k}, prompts in ``_size_order`` (prompts of one size share the shuffles)."""
    prompts = ProbeData(q.detach().reshape(-1, 1), rewards, groups).prompt_indices()
    by_size: dict[int, list[torch.Tensor]] = defaultdict(list)
    for rows in prompts:
        by_size[len(rows)].append(rows)
    smallest = min(by_size) if by_size else 0
    q, rewards = q.detach().float(), rewards.float()
    generator = torch.Generator().manual_seed(seed)
    result: dict[int, torch.Tensor] = {}
    for k in ks:
        if not 1 <= k <= smallest:
            raise ValueError(f"k={k} needs 1 <= k <= {smallest} (the fewest samples any prompt has)")
        per_prompt = []
        for n, rows_list in sorted(by_size.items()):
            rows = torch.stack(rows_list)  # (P, n)
            num_prompts, chunks = rows.size(0), n // k
            total = torch.zeros(num_prompts)
            for _ in range(shuffles):
                order = torch.argsort(torch.rand(num_prompts, n, generator=generator), dim=1)
                index = rows.gather(1, order)[:, : chunks * k].reshape(num_prompts * chunks, k)
                value = expected_best_of_k_reward(q[index], rewards[index], beta)  # (P·chunks,)
                total += value.reshape(num_prompts, chunks).mean(dim=1)
            per_prompt.append(total / shuffles)
        result[k] = torch.cat(per_prompt)
    return result


def mean_reward(rewards: torch.Tensor, groups: torch.Tensor) -> float:
    """E_{a~p0}[r]: the reward of sampling once, prompts weighted equally (π_{θ,1} for any θ)."""
    prompts = ProbeData(rewards.reshape(-1, 1), rewards, groups).prompt_indices()
    return torch.stack([rewards[rows].float().mean() for rows in prompts]).mean().item()
