"""ShiQ residuals on a hand-computed 2-step example, the token-MDP scans, and the tabular optimum."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qalign.losses import (
    fold_rewards,
    masked_aggregate,
    next_action_values,
    shiq_loss,
    shiq_multi_step_residuals,
    shiq_one_step_residuals,
    soft_returns_to_go,
)
from qalign.trainers.shiq import shiq_batch_loss
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
    zero_rewards,
)

BETA, GAMMA = 0.5, 0.9


def flat(nested) -> list[float]:
    """pytest.approx compares flat sequences only."""
    return torch.as_tensor(nested, dtype=torch.float64).flatten().tolist()


def two_step_example():
    """Row 0: two actions. Row 1: one action, then padding holding garbage that must not count
    (rewards excepted: a reward on a non-action token is an environment reward, so padding carries 0)."""
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)
    return dict(
        policy_logprobs=t([[-1.0, -0.5], [-0.7, 5.0]]),
        policy_lse=t([[2.0, 1.0], [0.1, 5.0]]),
        ref_logprobs=t([[-1.2, -0.4], [-0.5, -5.0]]),
        ref_lse=t([[1.5, 1.2], [0.3, 5.0]]),
        rewards=t([[0.0, 1.0], [2.0, 0.0]]),
        action_mask=torch.tensor([[1, 1], [1, 0]]),
    )


# Hand arithmetic for the example: ln ρ = lp − lp_ref, ΔV = LSE − LSE_ref, Δℓ = ln ρ + ΔV.
# Row 0: ln ρ = (0.2, −0.1), ΔV = (0.5, −0.2), Δℓ = (0.7, −0.3).
# Row 1: ln ρ = −0.2, ΔV = −0.2, Δℓ = −0.4.
ONE_STEP = [
    [0.5 * 0.7 - 0.0 - 0.9 * 0.5 * (-0.2),  # δ_0 = βΔℓ_0 − r_0 − γβΔV(s_1) = 0.44
     0.5 * (-0.3) - 1.0 - 0.0],  # δ_1 = βΔℓ_1 − r_1 − 0 (terminal) = −1.15
    [0.5 * (-0.4) - 2.0, 0.0],  # single action: −2.2; padding: 0
]  # fmt: skip
# Multi-step: soft_reward = r − β ln ρ: row 0 (0 − 0.1, 1 + 0.05) = (−0.1, 1.05).
MULTI_STEP = [
    [0.5 * 0.7 - 0.0 - 0.9 * (1.0 - 0.5 * (-0.1)),  # βΔℓ_0 − r_0 − γ·soft_reward_1 = −0.595
     0.5 * (-0.3) - 1.0],  # −1.15
    [0.5 * (-0.4) - 2.0, 0.0],
]  # fmt: skip


def test_one_step_residuals_equal_hand_computation():
    residuals = shiq_one_step_residuals(**two_step_example(), beta=BETA, gamma=GAMMA)
    assert flat(residuals) == pytest.approx(flat(ONE_STEP), abs=1e-12)
    # The same residuals as numbers worked out by hand (see the comments on ONE_STEP), row by row.
    assert flat(residuals) == pytest.approx([0.44, -1.15, -2.2, 0.0], abs=1e-12)


def test_multi_step_residuals_equal_hand_computation():
    residuals = shiq_multi_step_residuals(**two_step_example(), beta=BETA, gamma=GAMMA)
    assert flat(residuals) == pytest.approx(flat(MULTI_STEP), abs=1e-12)
    assert flat(residuals) == pytest.approx([-0.595, -1.15, -2.2, 0.0], abs=1e-12)
    # The V-form ε_t = Σ_k γ^{k−t}(r_k − β ln ρ_k) − βΔV(s_t), written out:
    # ε_0 = −0.1 + 0.9·1.05 − 0.5·0.5.
    assert -residuals[0, 0].item() == pytest.approx(-0.1 + 0.9 * 1.05 - 0.5 * 0.5)
    assert -residuals[0, 1].item() == pytest.approx(1.05 - 0.5 * (-0.2))


@pytest.mark.parametrize(
    "normalizer, expected",
    [
        ("sequence", ((0.595**2 + 1.15**2) / 2 + 2.2**2) / 2),
        ("token", (0.595**2 + 1.15**2 + 2.2**2) / 3),
        ("constant", (0.595**2 + 1.15**2 + 2.2**2) / (2 * 4)),
    ],
)
def test_loss_normalizers(normalizer, expected):
    loss, _ = shiq_loss(**two_step_example(), beta=BETA, gamma=GAMMA, normalizer=normalizer, max_length=4)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_multi_step_equals_v_form_on_random_input():
    """The Q-form the code uses and the V-form of docs/algorithms.md §4 are one function (up to sign)."""
    generator = torch.Generator().manual_seed(0)
    lp, lse, lq, lse_ref, r = (torch.randn(3, 6, generator=generator, dtype=torch.float64) for _ in range(5))
    mask = torch.ones(3, 6, dtype=torch.long)
    residuals = shiq_multi_step_residuals(lp, lse, lq, lse_ref, r, mask, beta=0.3, gamma=0.8)
    for b in range(3):
        for t in range(6):
            ret = sum(0.8 ** (k - t) * (r[b, k] - 0.3 * (lp[b, k] - lq[b, k])) for k in range(t, 6))
            epsilon = ret - 0.3 * (lse[b, t] - lse_ref[b, t])
            assert residuals[b, t].item() == pytest.approx(-epsilon.item(), abs=1e-12)


def test_stop_gradient_target_reaches_only_the_taken_logit():
    inputs = two_step_example()
    lp = inputs["policy_logprobs"].clone().requires_grad_()
    lse = inputs["policy_lse"].clone().requires_grad_()
    loss, _residuals = shiq_loss(**{**inputs, "policy_logprobs": lp, "policy_lse": lse}, beta=BETA, gamma=GAMMA,
                                stop_gradient_target=True, normalizer="token")  # fmt: skip
    loss.backward()
    # d/dlp_t and d/dLSE_t of (βΔℓ_t − sg[target])² / 3, with Δℓ_t = lp_t − lp_ref_t + LSE_t − LSE_ref_t.
    expected = [2 * BETA * r / 3 for r in flat(MULTI_STEP)]  # the padding entry is 0 already
    assert flat(lp.grad) == pytest.approx(flat(expected), abs=1e-12)
    assert flat(lse.grad) == pytest.approx(flat(expected), abs=1e-12)


def test_scans_skip_environment_tokens():
    mask = torch.tensor([[1, 0, 0, 1, 1]])
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert next_action_values(values, mask).tolist() == [[4.0, 4.0, 4.0, 5.0, 0.0]]
    # out_0 = 1 + γ·(4 + γ·5): environment tokens add nothing and do not discount.
    assert soft_returns_to_go(values, mask, 0.5).tolist()[0][0] == pytest.approx(1 + 0.5 * (4 + 0.5 * 5))
    # A reward on an environment token belongs to the action before it; one before any action is dropped.
    rewards = torch.tensor([[0.0, 1.0, 2.0, 0.5, 3.0]])
    assert fold_rewards(rewards, mask).tolist() == [[3.0, 0.0, 0.0, 0.5, 3.0]]
    assert fold_rewards(torch.tensor([[9.0, 1.0]]), torch.tensor([[0, 1]])).tolist() == [[0.0, 1.0]]


def test_masked_aggregate_rejects_unknown_normalizer():
    with pytest.raises(ValueError, match="normalizer"):
        masked_aggregate(torch.ones(1, 2), torch.ones(1, 2), "per_batch")


# ----------------------------------------------------------------------------- tabular token MDP


def shiq_args(**overrides):
    args = dict(beta=0.5, gamma=1.0, shiq_residual="multi_step", stop_gradient_target=False,
                loss_normalizer="sequence", max_completion_length=None)  # fmt: skip
    return SimpleNamespace(**{**args, **overrides})


def fit(policy, batch, args, steps=200, lr=0.1):
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = shiq_batch_loss(policy, batch, args)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


@pytest.mark.parametrize("residual", ["multi_step", "one_step"])
@pytest.mark.parametrize("stop_gradient_target", [False, True])
def test_tabular_shiq_reaches_the_kl_regularised_optimum(residual, stop_gradient_target):
    mdp = TokenMDP()
    ref = TabularLM(mdp, seed=0)
    rewards = random_rewards(mdp, seed=1)
    p_star = optimal_distribution(mdp, ref, rewards, beta=0.5)
    batch = collate(enumerated_rollouts(mdp, ref, rewards))
    policy = ref.clone()
    assert kl_to_optimal(policy, mdp, p_star) > 0.1  # the test can fail
    with single_thread():
        fit(policy, batch, shiq_args(shiq_residual=residual, stop_gradient_target=stop_gradient_target))
    assert kl_to_optimal(policy, mdp, p_star) < 0.01
    # The logits are the shifted soft Q: ℓ_θ − ℓ_ref = Q*/β at every decision state.
    _, q_star = soft_optimal_values(mdp, ref, rewards, beta=0.5)
    for state, q in q_star.items():
        shift = policy.table()[policy.index[state]] - ref.table()[ref.index[state]]
        assert shift.tolist() == pytest.approx((q / 0.5).tolist(), abs=0.05)


def test_tabular_shiq_multi_turn_masks_environment_tokens():
    """Environment tokens in the state, out of the loss, their reward credited to the action before."""
    mdp = TokenMDP(vocab_size=5, env_token=4, env_after=1)
    ref = TabularLM(mdp, seed=0)
    rewards = random_rewards(mdp, seed=1)
    env_rewards = {(x, a): 0.5 * (a % 2) for x in mdp.prompts for a in range(mdp.vocab_size)}
    p_star = optimal_distribution(mdp, ref, rewards, beta=0.5, env_rewards=env_rewards)
    rows = enumerated_rollouts(mdp, ref, rewards, env_rewards)
    assert any(0 in row["action_mask"] for row in rows)
    policy = ref.clone()
    with single_thread():
        fit(policy, collate(rows), shiq_args())
    assert kl_to_optimal(policy, mdp, p_star) < 0.01


def test_tabular_shiq_leaves_logits_unchanged_at_zero_reward():
    mdp = TokenMDP()
    ref = TabularLM(mdp, seed=0)
    batch = collate(enumerated_rollouts(mdp, ref, zero_rewards(mdp)))
    policy = ref.clone()
    with single_thread():
        loss = fit(policy, batch, shiq_args(), steps=20)
    assert loss == 0.0
    assert torch.equal(policy.table(), ref.table())  # exactly: the residuals are exactly zero at ℓ_θ = ℓ_ref
    # And from perturbed logits the zero-reward fixed point is ℓ_ref itself, not just any policy.
    perturbed = ref.clone()
    with torch.no_grad():
        noise = torch.randn(perturbed.lm_head.weight.shape, generator=torch.Generator().manual_seed(3))
        perturbed.lm_head.weight.add_(0.3 * noise)
    with single_thread():
        fit(perturbed, batch, shiq_args(), steps=300)
    decision_rows = [perturbed.index[s] for s in mdp.decision_states()]
    assert flat(perturbed.table()[decision_rows]) == pytest.approx(flat(ref.table()[decision_rows]), abs=1e-3)
