"""Q-probe losses against hand-computed numbers (docs/algorithms.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from qalign.losses.qprobe import (
    best_of_k_weights,
    expected_best_of_k_reward,
    qprobe_bt_loss,
    qprobe_ce_loss,
    qprobe_mse_loss,
    qprobe_pg_loss,
)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def pg_chunks() -> tuple[torch.Tensor, torch.Tensor]:
    """Two chunks of k = 3 whose softmax(q/β) at β = 2 are [1, 2, 3]/6 and [4, 1, 1]/6."""
    q = torch.tensor([[0.0, 2 * LN2, 2 * LN3], [2 * LN4, 0.0, 0.0]], requires_grad=True)
    r = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    return q, r


def test_pg_loss_equals_hand_computed_value():
    q, r = pg_chunks()
    loss = qprobe_pg_loss(q, r, beta=2.0, baseline=0.5)
    # ρ (chunk 1) = [1, 2, 3]/6, r − b = [.5, −.5, .5]: Σ ρ (r − b) = (0.5 − 1.0 + 1.5)/6 = 1/6
    # ρ (chunk 2) = [4, 1, 1]/6, r − b = [.5, .5, −.5]: Σ ρ (r − b) = (2.0 + 0.5 − 0.5)/6 = 2/6
    # L_PG = −mean(1/6, 2/6) = −1/4
    assert loss.item() == pytest.approx(-0.25, abs=1e-6)
    # Without baseline it is minus the exact expected reward of π_{θ,3}: −mean(4/6, 5/6) = −0.75.
    assert qprobe_pg_loss(q, r, beta=2.0).item() == pytest.approx(-0.75, abs=1e-6)
    assert expected_best_of_k_reward(q, r, 2.0).tolist() == pytest.approx([4 / 6, 5 / 6], abs=1e-6)


def test_pg_gradient_is_hand_computed_and_ignores_any_per_chunk_baseline():
    q, r = pg_chunks()
    grads = []
    for baseline in (0.0, 0.5, -3.0, torch.tensor([[0.25], [7.0]])):  # scalars and a per-chunk (C, 1) baseline
        q.grad = None
        qprobe_pg_loss(q, r, beta=2.0, baseline=baseline).backward()
        grads.append(q.grad.clone())
    for grad in grads[1:]:
        assert torch.allclose(grad, grads[0], atol=1e-7)
    # ∂/∂q_j of −(1/C) Σ_i ρ_i r_i = −(1/C) ρ_j (r_j − Σ_i ρ_i r_i) / β, with C = 2 and β = 2.
    rho = torch.tensor([[1, 2, 3], [4, 1, 1]]) / 6
    mean_r = (rho * r).sum(1, keepdim=True)  # [4/6, 5/6]
    expected = -(1 / 2) * rho * (r - mean_r) / 2
    assert torch.allclose(grads[0], expected, atol=1e-6)
    # Chunk 1, sample 1 written out: −½ · (1/6) · (1 − 4/6) / 2 = −1/72.
    assert grads[0][0, 0].item() == pytest.approx(-1 / 72, abs=1e-7)


def test_pg_loss_with_mask_equals_the_shorter_chunk():
    q = torch.tensor([[0.3, -1.0, 2.0, 9.0]])
    r = torch.tensor([[1.0, 0.0, 0.5, 1.0]])
    mask = torch.tensor([[True, True, True, False]])
    masked = qprobe_pg_loss(q, r, mask=mask)
    assert masked.item() == pytest.approx(qprobe_pg_loss(q[:, :3], r[:, :3]).item(), abs=1e-7)


def test_mse_ce_bt_losses():
    assert qprobe_mse_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0])).item() == pytest.approx(0.5)
    # CE: −log σ(0) = ln 2 for r = 1; −log(1 − σ(ln 3)) = −log(1/4) = ln 4 for r = 0; mean = 1.5 ln 2.
    ce = qprobe_ce_loss(torch.tensor([0.0, LN3]), torch.tensor([1.0, 0.0]))
    assert ce.item() == pytest.approx(1.5 * LN2, abs=1e-6)
    # BT: −log σ(ln 3 − 0) = −log(3/4).
    assert qprobe_bt_loss(torch.tensor([LN3]), torch.tensor([0.0])).item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_best_of_k_weights_argmax_and_softmax():
    q = torch.tensor([[0.1, 0.9, 0.5], [2.0, 2.0, -1.0]])
    hard = best_of_k_weights(q, beta=0.0)
    assert hard.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # first index on ties
    soft = best_of_k_weights(q, beta=0.5)
    assert torch.allclose(soft, torch.softmax(q / 0.5, dim=-1))
    assert torch.allclose(best_of_k_weights(q[:1], beta=1e-4), hard[:1], atol=1e-6)  # β → 0: the argmax
    r = torch.tensor([[0.0, 1.0, 0.2], [0.3, 0.0, 1.0]])
    assert expected_best_of_k_reward(r, r, 0.0).tolist() == pytest.approx([1.0, 1.0])  # oracle = max
    assert expected_best_of_k_reward(torch.zeros(2, 3), r, 1.0).tolist() == pytest.approx([0.4, 1.3 / 3])
    with pytest.raises(ValueError):
        qprobe_pg_loss(q, r, beta=0.0)
