"""DQO's λ-return, importance weights, value and policy losses on a hand-computed 2-step example, and
the tabular optimum (π_θ → π*, V_φ → V*) for λ ∈ {0, 0.95, 1}."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from qalign.losses import dqo_losses, importance_weights, lambda_returns
from qalign.trainers.dqo import attach_value_function, dqo_batch_loss
from tests.tabular import (
    TabularLM,
    TokenMDP,
    collate,
    enumerated_rollouts,
    kl_to_optimal,
    optimal_distribution,
    random_rewards,
    single_thread,
    soft_optimal_values,
)

BETA, GAMMA, LAM = 0.5, 0.9, 0.5


def flat(nested) -> list[float]:
    return torch.as_tensor(nested, dtype=torch.float64).flatten().tolist()


def two_step_example():
    """Row 0: two actions. Row 1: one action, then padding (garbage except the reward, which pads with 0)."""
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)
    return dict(
        policy_logprobs=t([[-1.0, -0.5], [-0.7, 5.0]]),
        ref_logprobs=t([[-1.2, -0.4], [-0.5, -5.0]]),
        values=t([[0.3, 0.6], [0.2, 9.0]]),
        rewards=t([[0.0, 1.0], [2.0, 0.0]]),
        action_mask=torch.tensor([[1, 1], [1, 0]]),
    )


# Hand arithmetic. ln ρ = (0.2, −0.1) and (−0.2). soft_reward = r − β ln ρ = (−0.1, 1.05) and (2.1).
# λ-return backwards: G_1 = 1.05 + γ·0 = 1.05;
# G_0 = −0.1 + γ((1−λ)V_1 + λG_1) = −0.1 + 0.9·(0.5·0.6 + 0.5·1.05).
G = [[-0.1 + 0.9 * (0.5 * 0.6 + 0.5 * 1.05), 1.05], [2.0 - 0.5 * (-0.2), None]]
# V residuals V_h − G_h; policy residuals β ln ρ_h + V_h − r_h − γ G_{h+1}.
VALUE_RES = [[0.3 - G[0][0], 0.6 - 1.05], [0.2 - 2.1, 0.0]]
POLICY_RES = [[0.5 * 0.2 + 0.3 - 0.0 - 0.9 * 1.05, 0.5 * (-0.1) + 0.6 - 1.0 - 0.0], [0.5 * (-0.2) + 0.2 - 2.0, 0.0]]


def test_lambda_return_equals_hand_computation():
    ex = two_step_example()
    soft_reward = ex["rewards"] - BETA * (ex["policy_logprobs"] - ex["ref_logprobs"])
    returns = lambda_returns(soft_reward, ex["values"], ex["action_mask"], GAMMA, LAM)
    assert returns[0].tolist() == pytest.approx([0.6425, 1.05], abs=1e-12)
    assert returns[0].tolist() == pytest.approx(G[0], abs=1e-12)
    assert returns[1, 0].item() == pytest.approx(2.1, abs=1e-12)


@pytest.mark.parametrize("lam, expected", [(1.0, -0.1 + 0.9 * 1.05), (0.0, -0.1 + 0.9 * 0.6)])
def test_lambda_extremes_are_monte_carlo_and_one_step(lam, expected):
    ex = two_step_example()
    soft_reward = ex["rewards"] - BETA * (ex["policy_logprobs"] - ex["ref_logprobs"])
    returns = lambda_returns(soft_reward, ex["values"], ex["action_mask"], GAMMA, lam)
    assert returns[0, 0].item() == pytest.approx(expected)


def test_losses_equal_hand_computation():
    out = dqo_losses(**two_step_example(), beta=BETA, gamma=GAMMA, lam=LAM, normalizer="token")
    assert flat(out.value_residuals) == pytest.approx(flat(VALUE_RES), abs=1e-12)
    assert flat(out.policy_residuals) == pytest.approx(flat(POLICY_RES), abs=1e-12)
    assert flat(POLICY_RES) == pytest.approx([-0.545, -0.45, -1.9, 0.0])
    assert out.value_loss.item() == pytest.approx((0.3425**2 + 0.45**2 + 1.9**2) / 3, abs=1e-12)
    assert out.policy_loss.item() == pytest.approx((0.545**2 + 0.45**2 + 1.9**2) / 3, abs=1e-12)


def test_importance_weights_equal_hand_computation():
    ex = two_step_example()
    behavior = torch.tensor([[-0.9, -0.8], [-0.5, 0.0]], dtype=torch.float64)
    token = importance_weights(ex["policy_logprobs"], behavior, ex["action_mask"], "token", clip=1.5)
    cumulative = importance_weights(ex["policy_logprobs"], behavior, ex["action_mask"], "cumulative", clip=1.5)
    # token: exp(−1.0 + 0.9), exp(−0.5 + 0.8) = 1.35 → stays under c = 1.5.
    # cumulative: exp(−0.1), exp(−0.1 + 0.3).
    assert flat(token) == pytest.approx([math.exp(-0.1), math.exp(0.3), math.exp(-0.2), 0.0], abs=1e-12)
    assert flat(cumulative) == pytest.approx([math.exp(-0.1), math.exp(0.2), math.exp(-0.2), 0.0], abs=1e-12)
    clipped = importance_weights(ex["policy_logprobs"], behavior, ex["action_mask"], "token", clip=1.0)
    assert clipped[0, 1].item() == 1.0
    out = dqo_losses(**ex, beta=BETA, gamma=GAMMA, lam=LAM, behavior_logprobs=behavior,
                     importance_sampling="cumulative", is_clip=1.5, normalizer="token")  # fmt: skip
    expected = (math.exp(-0.1) * 0.545**2 + math.exp(0.2) * 0.45**2 + math.exp(-0.2) * 1.9**2) / 3
    assert out.policy_loss.item() == pytest.approx(expected, abs=1e-12)


def test_stop_gradients_as_written():
    ex = two_step_example()
    lp = ex["policy_logprobs"].clone().requires_grad_()
    values = ex["values"].clone().requires_grad_()
    out = dqo_losses(**{**ex, "policy_logprobs": lp, "values": values}, beta=BETA, gamma=GAMMA, lam=LAM,
                     normalizer="token")  # fmt: skip

    def grads(loss):
        return torch.autograd.grad(loss, [lp, values], allow_unused=True, materialize_grads=True)

    policy_grad_lp, policy_grad_v = grads(out.policy_loss)
    value_grad_lp, value_grad_v = grads(out.value_loss)
    # L_π reaches θ only through β ln ρ_θ(a_h|s_h): d/dlp_h = 2 β residual_h / 3; nothing reaches V_φ.
    assert flat(policy_grad_lp) == pytest.approx([2 * BETA * r / 3 for r in flat(POLICY_RES)], abs=1e-12)
    assert flat(policy_grad_v) == [0.0] * 4
    # L_V reaches φ only through V_φ(s_h) (the λ-return is a detached target); nothing reaches θ.
    assert flat(value_grad_v) == pytest.approx([2 * r / 3 for r in flat(VALUE_RES)], abs=1e-12)
    assert flat(value_grad_lp) == [0.0] * 4


# ----------------------------------------------------------------------------- tabular token MDP


def dqo_args(**overrides):
    args = dict(beta=0.5, gamma=1.0, lam=1.0, importance_sampling="none", is_clip=1.0, loss_normalizer="sequence",
                max_completion_length=None, value_loss_coef=1.0)  # fmt: skip
    return SimpleNamespace(**{**args, **overrides})


@pytest.mark.parametrize(
    "lam, importance_sampling",
    [(0.0, "none"), (0.95, "none"), (1.0, "none"), (1.0, "token"), (1.0, "cumulative"), (0.95, "cumulative")],
)
def test_tabular_dqo_reaches_the_optimum_and_v_star(lam, importance_sampling):
    mdp = TokenMDP()
    ref = TabularLM(mdp, seed=0)
    rewards = random_rewards(mdp, seed=1)
    p_star = optimal_distribution(mdp, ref, rewards, beta=0.5)
    v_star, _ = soft_optimal_values(mdp, ref, rewards, beta=0.5)
    batch = collate(enumerated_rollouts(mdp, ref, rewards))
    policy = attach_value_function(ref.clone(), "head")  # V_φ: a linear head on the one-hot state = a table
    args = dqo_args(lam=lam, importance_sampling=importance_sampling)
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.1)
    assert kl_to_optimal(policy, mdp, p_star) > 0.1
    with single_thread():
        for _ in range(300):
            loss, _ = dqo_batch_loss(policy, batch, args)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert kl_to_optimal(policy, mdp, p_star) < 0.01
    head = policy.value_head.summary
    learned = {state: (head.weight[0, policy.index[state]] + head.bias[0]).item() for state in v_star}
    assert list(learned.values()) == pytest.approx(list(v_star.values()), abs=0.02)
