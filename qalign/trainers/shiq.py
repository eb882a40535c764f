"""ShiQ: Shifted-Q token-level Bellman training of the LLM's own logits (Clavier et al., "ShiQ: Bringing
back Bellman to LLMs", arXiv 2505.11081, NeurIPS 2025).

The logits are a shifted soft Q-function, ℓ_θ = ℓ_ref + Q/β: no value head, no target network, and at
inference plain sampling at temperature 1 from the trained model (no reference, no guidance). Off-policy:
it trains on rollouts from any behaviour policy: ``ShiQTrainer`` on an offline dataset (``qalign.collect``
or any (prompt, completion, reward) dataset) with the reference statistics precomputed once, and
``ShiQOnlineTrainer`` on completions it samples itself through GRPOTrainer's generation path.
The loss is ``qalign.losses.shiq_loss``; see docs/shiq_dqo.md for the choices the paper leaves open.

Example::

    from qalign.data.rollouts import load_rollouts
    from qalign.trainers.shiq import ShiQConfig, ShiQTrainer

    trainer = ShiQTrainer(
        model="path/or/hub-id",
        args=ShiQConfig(output_dir="out", beta=0.1, max_steps=100),
        train_dataset=load_rollouts("outputs/rollouts/arithmetic"),
    )
    trainer.train()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qalign.losses.shiq import shiq_loss
from qalign.trainers.grpo import GRPOConfig, GRPOTrainer
from qalign.trainers.offline import (
    OfflineConfig,
    OfflineTrainer,
    check_token_loss_args,
    completion_token_stats,
)
from qalign.trainers.policy_tokens import policy_token_mask
from qalign.trainers.sft_anchor import add_sft_anchor


@dataclass
class ShiQConfig(OfflineConfig):
    """OfflineConfig plus ShiQ's residual form and its stop-gradient."""

    shiq_residual: str = field(
        default="multi_step",
        metadata={
            "help": "'multi_step': path-consistency residual ε_t over the rest of the sequence (the paper's "
            "multi-step extension, for sparse rewards). 'one_step': one-step Bellman residual δ_t."
        },
    )
    stop_gradient_target: bool = field(
        default=False,
        metadata={
            "help": "Detach the bootstrapped target (semi-gradient, Q-learning style); default: minimise the "
            "residual in all its terms (residual gradient, as path consistency learning)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shiq_residual not in ("multi_step", "one_step"):
            raise ValueError(f"shiq_residual must be 'multi_step' or 'one_step', got {self.shiq_residual!r}")


def shiq_batch_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], args: ShiQConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass of ``model`` on a collated rollout batch → (ShiQ loss, detached metrics)."""
    stats = completion_token_stats(model, batch)
    mask = batch["action_mask"].bool()
    loss, residuals = shiq_loss(
        stats.logprobs, stats.lse, batch["ref_logprobs"], batch["ref_lse"], batch["rewards"], mask,
        beta=args.beta, gamma=args.gamma, residual=args.shiq_residual,
        stop_gradient_target=args.stop_gradient_target, normalizer=args.loss_normalizer,
        max_length=args.max_completion_length,
    )  # fmt: skip
    loss, anchor = add_sft_anchor(loss, stats.logprobs, batch, args)
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        log_ratio = (stats.logprobs - batch["ref_logprobs"]) * mask
        metrics = {
            "shiq/residual_rms": ((residuals.square() * mask).sum() / count).sqrt(),
            # E_data[ln π_θ/π_ref] per token: a KL(π_θ‖π_ref) estimate only when data ~ π_θ.
            "shiq/log_ratio": log_ratio.sum() / count,
            "shiq/delta_v": ((stats.lse - batch["ref_lse"]) * mask).sum() / count,
            "shiq/reward": batch["rewards"].sum(dim=1).mean(),
        }
        if anchor is not None:
            metrics["shiq/sft_nll"] = anchor.detach()
    return loss, metrics


class ShiQTrainer(OfflineTrainer):
    """Offline ShiQ on a rollout dataset; every ``transformers.Trainer`` feature (checkpoints, resume,
    accelerate/DeepSpeed, LoRA through ``peft_config``) works unchanged."""

    _tag_names = ["qalign", "shiq"]
    _method = "shiq"

    def batch_loss(self, model, inputs):
        return shiq_batch_loss(model, inputs, self.args)


# ----------------------------------------------------------------------------- online (GRPO machinery)


@dataclass
class ShiQOnlineConfig(GRPOConfig):
    """GRPOConfig (prompts, ``num_generations``, sampling, rollout engine, generation batches, reward
    functions) with ShiQ's loss, and the optional SFT anchor, in place of GRPO's. ``beta`` is ShiQ's β; being
    nonzero it also makes TRL keep the frozen reference (or disable the LoRA adapter) that ShiQ's reference
    statistics need."""

    beta: float = field(default=0.1, metadata={"help": "ShiQ's KL weight β > 0."})
    gamma: float = field(default=1.0, metadata={"help": "Discount γ per policy token."})
    shiq_residual: str = field(default="multi_step", metadata={"help": "'multi_step' (ε_t) or 'one_step' (δ_t)."})
    stop_gradient_target: bool = field(default=False, metadata={"help": "Detach the bootstrapped target."})
    loss_normalizer: str = field(
        default="sequence", metadata={"help": "'sequence', 'token' or 'constant' (see OfflineConfig)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_token_loss_args(self.beta, self.loss_normalizer)
        if self.shiq_residual not in ("multi_step", "one_step"):
            raise ValueError(f"shiq_residual must be 'multi_step' or 'one_step', got {self.shiq_residual!r}")


class ShiQOnlineTrainer(GRPOTrainer):
    """ShiQ on completions sampled from the current policy through GRPOTrainer's generation path (TRL's
    or a qalign rollout engine: ``rollout.backend``). Each generation batch gets its sequence rewards
    (on the last policy token), an ``action_mask`` (TRL's ``tool_mask``: tool output is environment) and
    the reference statistics; ``_compute_loss`` is ShiQ's. With ``num_iterations`` > 1 or stale engine
    weights the samples are off-policy, which ShiQ allows as it is.
    """

    _tag_names = ["trl", "shiq", "qalign"]
    _method = "shiq_online"
    loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean: Trainer divides by the accumulation steps

    def _generate_and_score_completions(self, inputs):
        # With β ≠ 0 TRL runs a reference forward here, but keeps only ln π_ref of the sampled tokens (from
        # temperature-scaled logits). ShiQ also needs LSE_ref of the raw logits, so its own forward
        # (_reference_token_stats) is the one reference forward of the step. In this call, TRL reads β only
        # to decide on its forward. TRL's β-weighted loss is replaced by ShiQ's, which reads args.beta.
        # Hiding β for the call therefore skips TRL's forward and changes nothing else.
        beta, self.beta = self.beta, 0.0
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.beta = beta
        # GRPOTrainer's per-sequence anchor column: ShiQ's anchor reads the token rewards set below instead.
        output.pop("sft_rewards", None)
        completion_mask = output["completion_mask"]
        action_mask = policy_token_mask(output)
        rewards = self._local_sequence_rewards(completion_mask.size(0))
        positions = torch.arange(action_mask.size(1), device=action_mask.device)
        last_action = (action_mask * (positions + 1)).argmax(dim=1)  # last policy token of each completion
        token_rewards = torch.zeros(action_mask.shape, dtype=torch.float32, device=action_mask.device)
        has_action = action_mask.sum(dim=1) > 0
        token_rewards[has_action, last_action[has_action]] = rewards.to(token_rewards.device)[has_action].float()
        output.update(rewards=token_rewards, action_mask=action_mask, **self._reference_token_stats(output))
        return output

    @torch.no_grad()
    def _reference_token_stats(self, output) -> dict[str, torch.Tensor]:
        import contextlib

        if self.ref_model is not None:
            model, context = self.ref_model, contextlib.nullcontext()
        else:  # PEFT: the base model with the adapter disabled is π_ref
            model, context = self.model, self.accelerator.unwrap_model(self.model).disable_adapter()
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        step = self.args.per_device_train_batch_size
        logprobs, lse = [], []
        with context:
            for start in range(0, output["prompt_ids"].size(0), step):
                stats = completion_token_stats(model, {k: output[k][start : start + step] for k in keys})
                logprobs.append(stats.logprobs)
                lse.append(stats.lse)
        return {"ref_logprobs": torch.cat(logprobs), "ref_lse": torch.cat(lse)}

    def _compute_loss(self, model, inputs):
        loss, metrics = shiq_batch_loss(model, inputs, self.args)
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather(value.detach().float()).mean().item())
        return loss
