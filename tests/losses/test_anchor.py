"""The SFT anchor against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from qalign.losses.anchor import success_nll


def test_mean_nll_of_the_successful_sequences_only():
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.1, 0.1, 0.1], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # rows 0 and 2 succeeded
    # Row 0: (ln 2 + ln 4) / 2 over its two actions (the masked third is ignored); row 2: ln 2. Row 1 failed.
    expected = ((math.log(2) + math.log(4)) / 2 + math.log(2)) / 2
    assert success_nll(logprobs, rewards, mask).item() == pytest.approx(expected)
    # A higher threshold leaves no success: 0, and the gradient is defined (zero).
    leaf = logprobs.clone().requires_grad_()
    none = success_nll(leaf, rewards, mask, threshold=1.0)
    none.backward()
    assert none.item() == 0.0 and torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_gradient_raises_the_successful_tokens_only():
    leaf = torch.zeros(2, 2, requires_grad=True)
    success_nll(leaf, torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.ones(2, 2)).backward()
    assert torch.equal(leaf.grad, torch.tensor([[-0.5, -0.5], [0.0, 0.0]]))  # d/dlogp of −mean: −1/2 per token
