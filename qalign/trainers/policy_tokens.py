"""Which completion tokens are the policy's actions, for every loss over a TRL generation batch."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def policy_token_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``completion_mask`` without tool output: TRL marks the tokens a tool wrote with ``tool_mask = 0``;
    they are the environment's answer, not actions the policy took, so no loss is taken on them."""
    mask = batch["completion_mask"]
    return mask * batch["tool_mask"] if "tool_mask" in batch else mask
