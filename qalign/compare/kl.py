"""KL(π ‖ π_ref) per token on held-out prompts, measured the same way for every kind of policy.

The states are those a policy visits on its own: one completion per prompt sampled from π at T = 1.
At each visited state s_t the full-vocabulary divergence

    KL_t = Σ_a π(a|s_t) · (ln π(a|s_t) − ln π_ref(a|s_t))

is averaged over all completion tokens. A fine-tuned LM gives π by its logits (teacher-forced here on
its own samples); Q#'s guided policy by the guided logits its engine builds while it samples
(``GuidedEngine.kl_summary``, the same sum at the same states). Best-of-k has no per-token
distribution: its sequence-level KL is at most ln k − (k−1)/k (Beirami et al., 2024), reported per
token by dividing by the mean completion length.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) ‖ softmax(ref_logits)) over the last axis: ``(..., V)`` → ``(...)``."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_q = torch.log_softmax(ref_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


@torch.no_grad()
def completion_kl(model: PreTrainedModel, ref_model: PreTrainedModel, prompt_ids: list[int],
                  completion_ids: list[int]) -> list[float]:  # fmt: skip
    """KL_t at each state of one completion (the prompt, then the prompt plus the first t tokens)."""
    if not completion_ids:
        return []
    ids = torch.tensor([prompt_ids + completion_ids[:-1]], device=next(model.parameters()).device)
    start = len(prompt_ids) - 1  # logits at position i predict token i + 1
    logits = model(input_ids=ids).logits[0, start:]
    ref_logits = ref_model(input_ids=ids.to(next(ref_model.parameters()).device)).logits[0, start:]
    return token_kl(logits, ref_logits.to(logits.device)).tolist()


def best_of_k_kl_bound(k: int) -> float:
    """Upper bound on KL(best-of-k ‖ π_ref) per *sequence*: ln k − (k − 1)/k (0 for k = 1)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return math.log(k) - (k - 1) / k
