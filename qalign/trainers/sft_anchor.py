"""The SFT anchor's config keys and its one addition to a loss, shared by every trainer that offers it.

The anchor is RFT's term beside a method's own loss: λ × the mean NLL of the batch's successful samples
(the math, and why it exists, is in ``qalign.losses.anchor``). Offline ShiQ and DQO add it to their Bellman
losses, online ShiQ to its loss on the generation batch, GRPO and QAE to TRL's policy loss (so that an
online method with the anchor can be compared with the same anchor on the GRPO family).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qalign.losses.anchor import success_nll


@dataclass
class SFTAnchorConfig:
    """The SFT anchor's keys. Configs that inherit them call ``check_sft_anchor_args`` from their
    ``__post_init__``."""

    sft_coef: float = field(
        default=0.0,
        metadata={
            "help": "λ of the SFT anchor: adds λ × the mean NLL (under the untempered policy) of the batch's "
            "samples whose reward exceeds sft_reward_threshold (online: the generation batch's), RFT's term "
            "beside the method's own loss (qalign's choice; 0 = the published method)."
        },
    )
    sft_reward_threshold: float = field(
        default=0.0,
        metadata={"help": "A sample counts as successful for the SFT anchor when its reward is above this."},
    )

    def check_sft_anchor_args(self) -> None:
        if not self.sft_coef >= 0:
            raise ValueError(f"sft_coef must be >= 0 (0 turns the SFT anchor off), got {self.sft_coef}")


def add_sft_anchor(
    loss: torch.Tensor, policy_logprobs: torch.Tensor, batch: dict[str, torch.Tensor], args: SFTAnchorConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``loss`` + sft_coef × the SFT anchor (``qalign.losses.anchor.success_nll``) → (loss, anchor or None).

    ``batch`` holds per-token ``rewards`` (a sample's reward is their sum) and the ``action_mask``. None (and
    ``loss`` unchanged) when ``args.sft_coef`` is 0, the published method.
    """
    sft_coef = getattr(args, "sft_coef", 0.0)  # settings objects saved before the anchor existed have none
    if sft_coef <= 0:
        return loss, None
    anchor = success_nll(policy_logprobs, batch["rewards"], batch["action_mask"].bool(), args.sft_reward_threshold)
    return loss + sft_coef * anchor, anchor
