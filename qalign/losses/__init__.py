"""Every algorithm's math as pure tensor functions, one module per family.

Trainers only gather tensors and call these; each is tested alone on hand-computed numbers.
The Q# value-model diagnostics stay in ``qalign.losses.qsharp_diagnostics``: they score a fit, they
are not a training objective, and their generic names (``auroc``, ``weighted_mean``) read best qualified.
"""

from qalign.losses.advantages import quantile_advantages, quantile_baseline
from qalign.losses.anchor import success_nll
from qalign.losses.dqo import DQOLosses, dqo_losses, dqo_soft_rewards, importance_weights, lambda_returns
from qalign.losses.qprobe import (
    QPROBE_LOSSES,
    best_of_k_weights,
    expected_best_of_k_reward,
    qprobe_bt_loss,
    qprobe_ce_loss,
    qprobe_mse_loss,
    qprobe_pg_loss,
)
from qalign.losses.qsharp import (
    GUIDANCE_MODES,
    NON_CANDIDATE_RULES,
    VALUE_HEADS,
    bernoulli_guidance_offset,
    bernoulli_value_loss,
    cd_guidance_offset,
    expected_value,
    guidance_offset,
    guided_logits,
    histogram_guidance_offset,
    histogram_value_loss,
    kl_divergence,
    nearest_atom,
    non_candidate_baseline,
    value_loss,
)
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
    "GUIDANCE_MODES",
    "NON_CANDIDATE_RULES",
    "QPROBE_LOSSES",
    "VALUE_HEADS",
    "DQOLosses",
    "bernoulli_guidance_offset",
    "bernoulli_value_loss",
    "best_of_k_weights",
    "cd_guidance_offset",
    "dqo_losses",
    "dqo_soft_rewards",
    "expected_best_of_k_reward",
    "expected_value",
    "fold_rewards",
    "guidance_offset",
    "guided_logits",
    "histogram_guidance_offset",
    "histogram_value_loss",
    "importance_weights",
    "kl_divergence",
    "lambda_returns",
    "masked_aggregate",
    "nearest_atom",
    "next_action_values",
    "non_candidate_baseline",
    "qprobe_bt_loss",
    "qprobe_ce_loss",
    "qprobe_mse_loss",
    "qprobe_pg_loss",
    "quantile_advantages",
    "quantile_baseline",
    "shiq_loss",
    "shiq_multi_step_residuals",
    "shiq_one_step_residuals",
    "soft_returns_to_go",
    "success_nll",
    "value_loss",
]
