"""GatheredRewardsMixin keeps the gathered rewards; summed_rewards is TRL's weighted sum with NaN kept."""

import math

import torch

from qalign.trainers.gathered_rewards import GatheredRewardsMixin, summed_rewards


def test_summed_rewards_skips_unscored_functions_and_keeps_unscorable_nan():
    nan = math.nan
    rewards = torch.tensor([[1.0, nan], [nan, nan], [2.0, 3.0], [0.0, -4.0]])
    weights = torch.tensor([1.0, 0.5])
    # by hand: 1·1; no function scored; 1·2 + 0.5·3; 1·0 + 0.5·(−4)
    total = summed_rewards(rewards, weights)
    assert total[0].item() == 1.0 and math.isnan(total[1].item())
    assert total[2].item() == 3.5 and total[3].item() == -2.0


class _Base:
    def __init__(self, result: torch.Tensor):
        self.result = result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        return self.result


class _Trainer(GatheredRewardsMixin, _Base):
    pass


def test_mixin_keeps_the_latest_call():
    trainer = _Trainer(torch.ones(4, 1))
    assert trainer._gathered_rewards_per_func is None
    first = trainer._calculate_rewards([], [], [], [])
    assert trainer._gathered_rewards_per_func is first
    trainer.result = torch.zeros(4, 1)
    second = trainer._calculate_rewards([], [], [], [])
    assert trainer._gathered_rewards_per_func is second and second.sum().item() == 0.0
