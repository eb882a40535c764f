from __future__ import annotations

import torch

from qalign.trainers.policy_tokens import policy_token_mask


def test_tool_output_is_not_the_policys_and_padding_never_is():
    completion_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    tool_mask = torch.tensor([[1, 0, 0, 1, 1], [1, 1, 1, 1, 1]])  # row 0: tokens 1-2 came from a tool
    assert policy_token_mask({"completion_mask": completion_mask}).tolist() == completion_mask.tolist()
    mask = policy_token_mask({"completion_mask": completion_mask, "tool_mask": tool_mask})
    assert mask.tolist() == [[1, 0, 0, 1, 0], [1, 1, 0, 0, 0]]
