"""GRPO: TRL's GRPOTrainer, unchanged in its math, as qalign's baseline.

The subclass exists so every qalign trainer shares one registry entry point, one config parser
and (with the rollout issue) one rollout engine; with the same config and seed it produces the
same numbers as ``trl.GRPOTrainer``.

Example::

    from qalign.trainers.grpo import GRPOConfig, GRPOTrainer
    from qalign.reward import accuracy_reward

    trainer = GRPOTrainer(
        model="path/or/hub-id",
        reward_funcs=[accuracy_reward],
        args=GRPOConfig(output_dir="out", num_generations=8),
        train_dataset=dataset,  # columns: prompt, answer
    )
    trainer.train()

Shao et al., "DeepSeekMath" (arXiv 2402.03300).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import trl

from qalign.rollout.config import RolloutArguments


@dataclass
class GRPOConfig(trl.GRPOConfig):
    """TRL's GRPOConfig, every field under its own name and default (loss_type, beta, epsilon_high, …),
    except that an unset ``bf16`` means "bf16 where the GPU supports it": TRL's default (always bf16)
    makes every CPU run fail at start-up."""

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()


class GRPOTrainer(trl.GRPOTrainer):
    """TRL's GRPOTrainer; qalign's hooks (rollout engine, logging of gathered rewards) go here.

    ``rollout_args`` selects the rollout engine (``rollout.backend``); with ``hf`` TRL's own
    generation runs unchanged.
    """

    _tag_names = ["trl", "grpo", "qalign"]

    def __init__(self, *args, rollout_args: RolloutArguments | None = None, **kwargs):
        self.rollout_args = rollout_args or RolloutArguments()
        super().__init__(*args, **kwargs)
