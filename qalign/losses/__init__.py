"""Every algorithm's math as pure tensor functions, one module per family.

Trainers only gather tensors and call these; each is tested alone on hand-computed numbers.
"""

from qalign.losses.advantages import quantile_advantages, quantile_baseline
from qalign.losses.dqo import DQOLosses, dqo_losses, dqo_soft_rewards, importance_weights, lambda_returns
from qalign.losses.shiq import (
    fold_rewards,
    masked_aggregate,
    next_action_values,
    shiq_loss,
    shiq_multi_step_residuals,
    shiq_one_step_residuals,
    soft_returns_to_go,
)

__all__ = [
    "DQOLosses",
    "dqo_losses",
    "dqo_soft_rewards",
    "fold_rewards",
    "importance_weights",
    "lambda_returns",
    "masked_aggregate",
    "next_action_values",
    "quantile_advantages",
    "quantile_baseline",
    "shiq_loss",
    "shiq_multi_step_residuals",
    "shiq_one_step_residuals",
    "soft_returns_to_go",
]
