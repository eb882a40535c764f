"""QAE: GRPO with the group K-quantile baseline (Wu et al., "Quantile Advantage Estimation",
arXiv 2509.22611).

Â_i = (R_i − b_K(q)) / (std_j R_j + ε) with b_K the right-continuous K-quantile of the group's
rewards (see ``qalign.losses.quantile_advantages``). With binary rewards only successes on hard
prompts (p ≤ 1 − K) and only failures on easy ones get a nonzero advantage. Everything else —
loss, clipping, KL, normalisation — is GRPO's, inherited from TRL.

Example::

    trainer = QAETrainer(model=..., reward_funcs=[accuracy_reward],
                         args=QAEConfig(output_dir="out", quantile_k=0.4), train_dataset=dataset)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qalign.losses import quantile_advantages
from qalign.trainers.gathered_rewards import summed_rewards
from qalign.trainers.grpo import GRPOConfig, GRPOTrainer


@dataclass
class QAEConfig(GRPOConfig):
    """GRPOConfig plus the quantile baseline, on the paper's DAPO recipe: clip-higher (``epsilon_high``
    0.28) by default, and DAPO's dynamic sampling as an option (``dynamic_sampling=True``,
    ``dynamic_sampling_max_rounds``, from GRPOConfig): groups whose rewards are all equal are dropped and
    the batch is refilled from further prompts. It is off by default so that a step costs one generation
    batch, as in GRPO; when on, ``dynamic_sampling/sampled_completions`` counts every completion sampled,
    dropped ones included, for comparisons at equal sample budget. With the K-quantile baseline a group
    with signal can still give some completions zero advantage (``qae/zero_advantage_frac``)."""

    quantile_k: float = field(
        default=0.4,
        metadata={
            "help": "K of the K-quantile baseline, in (0, 1). Paper: 0.4; 0.6 if entropy collapses. "
            "(For the group mean, run algorithm grpo.)"
        },
    )
    quantile_interpolation: str = field(
        default="paper",
        metadata={
            "help": "'paper': right-continuous empirical quantile (Eq. 3). 'torch_linear': torch.quantile's "
            "linear interpolation, as the official verl code, to reproduce its runs."
        },
    )
    epsilon_high: float | None = field(
        default=0.28, metadata={"help": "Upper clip ('clip-higher'), 0.28 in the paper's DAPO recipe."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.quantile_k < 1.0:  # outside, the baseline would silently be GRPO's group mean
            raise ValueError(f"quantile_k: {self.quantile_k} is out of range; a number in (0, 1), the paper's 0.4 "
                             "(for the group mean, use algorithm grpo)")  # fmt: skip
        if self.quantile_interpolation not in ("paper", "torch_linear"):
            raise ValueError(
                f"quantile_interpolation must be 'paper' or 'torch_linear', got {self.quantile_interpolation!r}"
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "QAE defines its baseline on the summed reward: use multi_objective_aggregation='sum_then_normalize'"
            )


class QAETrainer(GRPOTrainer):
    """GRPOTrainer whose advantages use the K-quantile baseline instead of the group mean.

    TRL computes advantages inline in ``_generate_and_score_completions``; this recomputes them
    from the same gathered rewards (kept by ``GatheredRewardsMixin``, through GRPOTrainer) and swaps
    them in, so the rest of TRL's step — slicing per process, logging, the loss — is untouched.
    """

    _tag_names = ["trl", "qae", "qalign"]
    _method = "qae"

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        # NaN for a completion no reward function scored: quantile_advantages leaves it out of the baseline.
        rewards = summed_rewards(self._gathered_rewards_per_func, self.reward_weights)
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        all_advantages = quantile_advantages(
            rewards,
            num_generations,
            quantile_k=self.args.quantile_k,
            scale_rewards=self.scale_rewards,
            interpolation=self.args.quantile_interpolation,
        )
        local = output["advantages"].shape[0]
        start = self.accelerator.process_index * local
        output["advantages"] = all_advantages[start : start + local].to(output["advantages"].device)

        # Replace the GRPO advantages TRL just logged with the ones actually used.
        logged = self._logs["advantages"]
        for _ in range(min(len(all_advantages), len(logged))):
            logged.pop()
        logged.extend(all_advantages.tolist())
        self._metrics[mode]["qae/zero_advantage_frac"].append((all_advantages == 0).float().mean().item())
        return output
