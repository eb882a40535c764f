"""QAE's K-quantile baseline against hand-computed values (docs/algorithms.md §2)."""

import math
import statistics
from fractions import Fraction

import pytest
import torch

from qalign.losses import quantile_advantages, quantile_baseline

EPS = 1e-4


def binary_group(num_correct: int, group_size: int) -> list[float]:
    return [1.0] * num_correct + [0.0] * (group_size - num_correct)


@pytest.mark.parametrize("group_size", [4, 5, 8, 16])
@pytest.mark.parametrize("quantile_k", [0.2, 0.4, 0.6, 0.8])
def test_binary_rewards_follow_eq4(group_size, quantile_k):
    # Eq. 4: b_K = 0 if p <= 1 - K else 1, decided in exact arithmetic.
    for num_correct in range(group_size + 1):
        rewards = binary_group(num_correct, group_size)
        p = Fraction(num_correct, group_size)
        baseline = 0.0 if p <= 1 - Fraction(str(quantile_k)) else 1.0
        std = statistics.stdev(rewards)
        expected = [(r - baseline) / (std + EPS) for r in rewards]
        got = quantile_advantages(torch.tensor(rewards), group_size, quantile_k)
        assert got.tolist() == pytest.approx(expected, abs=1e-6), (num_correct, group_size, quantile_k)


@pytest.mark.parametrize("group_size", [4, 5, 8, 16])
@pytest.mark.parametrize("quantile_k", [0.2, 0.4, 0.6, 0.8])
def test_all_equal_groups_get_zero_advantage(group_size, quantile_k):
    for value in (0.0, 1.0, 0.3):
        got = quantile_advantages(torch.full((2 * group_size,), value), group_size, quantile_k)
        assert torch.equal(got, torch.zeros(2 * group_size))


def test_paper_vs_torch_linear_g8_k04():
    # 5 of 8 correct: paper's right-continuous quantile is 1, torch.quantile's linear rule gives 0.8.
    grouped = torch.tensor([binary_group(5, 8)])
    assert quantile_baseline(grouped, 0.4, "paper").item() == 1.0
    assert quantile_baseline(grouped, 0.4, "torch_linear").item() == pytest.approx(0.8)
    # The linear rule by hand: position K·(G−1) = 2.8 between sorted[2] = 0 and sorted[3] = 1.
    advantages = quantile_advantages(grouped.flatten(), 8, 0.4, interpolation="torch_linear")
    std = statistics.stdev(binary_group(5, 8))
    assert advantages[0].item() == pytest.approx((1 - 0.8) / (std + EPS))
    assert advantages[-1].item() == pytest.approx((0 - 0.8) / (std + EPS))


@pytest.mark.parametrize("quantile_k", [0.6, float(torch.tensor(0.6))])
def test_float_trap_06_times_5(quantile_k):
    # K·G = 3 exactly, but K from float32 gives 3.0000001: a naive ceil picks the 4th value (0.75);
    # the right-continuous quantile is the 3rd (0.5).
    assert math.ceil(float(torch.tensor(0.6)) * 5) == 4
    rewards = torch.tensor([0.75, 0.0, 1.0, 0.25, 0.5])
    assert quantile_baseline(rewards.view(1, 5), quantile_k).item() == 0.5
    std = statistics.stdev(rewards.tolist())
    expected = [(r - 0.5) / (std + EPS) for r in rewards.tolist()]
    assert quantile_advantages(rewards, 5, quantile_k).tolist() == pytest.approx(expected, abs=1e-6)


def test_ties_and_non_binary_rewards():
    # sorted [0.2, 0.5, 0.5, 1.0]; K = 0.5 → ceil(2) − 1 = index 1 → 0.5; K = 0.6 → ceil(2.4) − 1 = 2 → 0.5;
    # K = 0.8 → ceil(3.2) − 1 = 3 → 1.0; K = 0.2 → ceil(0.8) − 1 = 0 → 0.2.
    grouped = torch.tensor([[0.5, 1.0, 0.2, 0.5]])
    assert [quantile_baseline(grouped, k).item() for k in (0.2, 0.5, 0.6, 0.8)] == pytest.approx([0.2, 0.5, 0.5, 1.0])


def test_groups_are_consecutive_blocks():
    # Two groups of 4 (TRL's order): hard prompt (1 of 4 right), easy prompt (3 of 4 right), K = 0.4.
    rewards = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    got = quantile_advantages(rewards, 4, 0.4)
    std = statistics.stdev([0.0, 1.0, 0.0, 0.0])
    # hard: b = 0, only the success moves; easy: b = 1, only the failure moves.
    expected = [0, 1 / (std + EPS), 0, 0, 0, 0, -1 / (std + EPS), 0]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_no_scaling_and_batch_scaling():
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0])
    # K = 0.4: F(0) = 0.25 < 0.4 → b = 1.
    assert quantile_advantages(rewards, 4, 0.4, scale_rewards=False).tolist() == [-1.0, 0.0, 0.0, 0.0]
    assert quantile_advantages(rewards, 4, 0.4, scale_rewards="none").tolist() == [-1.0, 0.0, 0.0, 0.0]
    batch = quantile_advantages(rewards, 2, 0.4, scale_rewards="batch")
    std = statistics.stdev(rewards.tolist())
    # groups [0, 1] (b = 0... F(0) = 0.5 >= 0.4 → b = 0) and [1, 1] (b = 1)
    assert batch.tolist() == pytest.approx([0.0, 1 / (std + EPS), 0.0, 0.0], abs=1e-6)


def test_k_outside_unit_interval_is_the_mean():
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0])
    got = quantile_advantages(rewards, 4, 0.0, scale_rewards=False)
    assert got.tolist() == pytest.approx([-0.75, 0.25, 0.25, 0.25])


def test_unscorable_completions_are_left_out():
    # NaN = every reward function returned None: excluded from the group, advantage 0.
    rewards = torch.tensor([float("nan"), 0.0, 1.0, 1.0])
    got = quantile_advantages(rewards, 4, 0.4)
    std = statistics.stdev([0.0, 1.0, 1.0])
    # finite [0, 1, 1]: ceil(0.4·3) − 1 = 1 → b = 1
    assert got.tolist() == pytest.approx([0.0, -1 / (std + EPS), 0.0, 0.0], abs=1e-6)


def test_bad_shapes_and_options_are_rejected():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        quantile_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="interpolation"):
        quantile_advantages(torch.zeros(4), 4, interpolation="nearest")
    with pytest.raises(ValueError, match="scale_rewards"):
        quantile_advantages(torch.zeros(4), 4, scale_rewards="sometimes")
