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

``dynamic_sampling=True`` adds DAPO's dynamic sampling (Yu et al., "DAPO", arXiv 2503.14476): prompt
groups whose rewards are all equal are dropped and the batch is refilled with groups of further prompts.
``sft_coef`` = λ > 0 adds the SFT anchor (``qalign.trainers.sft_anchor``) to TRL's policy loss:

    L = L_GRPO + λ · E_{y: R(y) > τ} [ −(1/|y|) Σ_t ln π_θ(a_t | s_t) ]

over the micro-batch's successful completions, with π_θ untempered (the same term online ShiQ adds), so
that GRPO with the anchor is the control for online ShiQ with it. λ = 0 (the default) is TRL's GRPO.

Shao et al., "DeepSeekMath" (arXiv 2402.03300).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import trl
from trl.extras.profiling import profiling_context

from qalign.data.rollouts import completion_token_stats
from qalign.distributed import full_parameters, guard_interpreter_exit
from qalign.losses.anchor import success_nll
from qalign.rollout.base import RolloutUnavailable, SamplingConfig
from qalign.rollout.config import RolloutArguments
from qalign.trainers.async_rollouts import AsyncRolloutsMixin
from qalign.trainers.device import apply_device_defaults
from qalign.trainers.dynamic_sampling import DynamicSamplingMixin
from qalign.trainers.gathered_rewards import GatheredRewardsMixin, summed_rewards
from qalign.trainers.model_card import ModelCardMixin
from qalign.trainers.policy_tokens import policy_token_mask
from qalign.trainers.saving import LoadableFinalSaveMixin
from qalign.trainers.sft_anchor import SFTAnchorConfig

logger = logging.getLogger(__name__)


@dataclass
class GRPOConfig(trl.GRPOConfig, SFTAnchorConfig):
    """TRL's GRPOConfig, every field under its own name and default (loss_type, beta, epsilon_high, …),
    except that an unset ``bf16`` means "bf16 where the GPU supports it" (TRL's default, always bf16,
    makes every CPU run fail at start-up) and that a machine without CUDA trains on the CPU; plus
    DAPO's dynamic sampling and the SFT anchor (both off by default)."""

    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "DAPO's dynamic sampling: drop the prompt groups whose rewards are all equal (zero "
            "advantage, no policy gradient) and refill the batch with groups of further training prompts, "
            "drawn at random, so every step trains on groups with signal. Every sampled completion, dropped "
            "or not, is counted in the `dynamic_sampling/sampled_completions` metric."
        },
    )
    dynamic_sampling_max_rounds: int = field(
        default=9,
        metadata={
            "help": "With `dynamic_sampling`: the most extra generation rounds per generation batch (so at "
            "most 1 + N rounds; 9 gives the 10 generation batches of verl's DAPO scripts). When they "
            "are spent the batch is completed with dropped groups (zero advantage) and a warning is logged."
        },
    )

    def __post_init__(self) -> None:
        apply_device_defaults(self)
        super().__post_init__()
        self.check_sft_anchor_args()
        if not isinstance(self.dynamic_sampling, bool):
            raise ValueError(f"dynamic_sampling must be true or false, got {self.dynamic_sampling!r}")
        rounds = self.dynamic_sampling_max_rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(
                f"dynamic_sampling_max_rounds must be an integer >= 1 (extra generation rounds), got {rounds!r}"
            )
        local_rows = self.per_device_train_batch_size * self.steps_per_generation
        # Each process keeps or drops its own groups, so no group may straddle two processes.
        if self.dynamic_sampling and self.world_size > 1 and local_rows % self.num_generations:
            raise ValueError(
                f"dynamic_sampling with {self.world_size} processes needs per_device_train_batch_size × "
                f"steps_per_generation ({local_rows}) to be a multiple of num_generations ({self.num_generations})"
            )


class GRPOTrainer(
    ModelCardMixin,
    AsyncRolloutsMixin,
    DynamicSamplingMixin,
    GatheredRewardsMixin,
    LoadableFinalSaveMixin,
    trl.GRPOTrainer,
):
    """TRL's GRPOTrainer; qalign's hooks (rollout engine, the gathered rewards of each scoring call) go here.

    ``rollout_args`` selects the rollout engine (``rollout.backend``); with ``hf`` TRL's own
    generation runs unchanged. With ``vllm`` / ``vllm_server`` a qalign engine replaces TRL's
    narrow generation hook (``_generate_single_turn``): weights are pushed to it every
    ``rollout.sync_every`` optimizer steps, and its sampling log-probs feed TRL's importance-sampling
    correction (``vllm_importance_sampling_correction``), exactly as TRL's own vLLM path does.
    ``rollout_engine`` injects an already built engine (shared servers, tests); the trainer then
    leaves closing it to the caller. ``rollout.async_steps`` K > 0 samples the generation batches of the
    next K optimizer steps on the engine while the current step trains (``AsyncRolloutsMixin``).

    ``args.dynamic_sampling`` runs, in place of TRL's one call to ``_generate_and_score_completions`` per
    generation batch, up to 1 + ``dynamic_sampling_max_rounds`` calls (the first on the dataloader's
    prompts, the others on prompts drawn from the training set) and keeps the groups whose gathered
    rewards differ, until every process holds a full batch. Each call is the whole hook chain (QAE's
    baseline, ShiQ's token rewards), so the kept rows carry the values that hook gave them.
    """

    _tag_names = ["trl", "grpo", "qalign"]
    _method = "grpo"

    def __init__(self, *args, rollout_args: RolloutArguments | None = None, rollout_engine=None, **kwargs):
        self.rollout_args = rollout_args or RolloutArguments()
        self.rollout_engine = None
        super().__init__(*args, **kwargs)
        if self.accelerator.num_processes > 1:
            guard_interpreter_exit()
        if rollout_engine is not None or self.rollout_args.rollout_backend != "hf":
            self._attach_rollout_engine(rollout_engine)
        if getattr(self.args, "dynamic_sampling", False):
            self._check_dynamic_sampling_dataset()

    # ------------------------------------------------------------------ rollout engine hook

    def _attach_rollout_engine(self, engine) -> None:
        from qalign.rollout.factory import build_engine

        if self.args.use_vllm:
            raise ValueError("set either TRL's use_vllm or qalign's rollout.backend, not both")
        self._owns_rollout_engine = engine is None
        if engine is None:
            args = self.args
            max_len = (
                (args.max_prompt_length + args.max_completion_length)
                if getattr(args, "max_prompt_length", None)
                else None
            )
            # The engine starts from the model's current weights: gathered first under ZeRO-3.
            with full_parameters(self.accelerator.unwrap_model(self.model)) as model:
                engine = build_engine(
                    self.rollout_args, model, self._tokenizer,
                    seed=args.seed + self.accelerator.process_index, max_model_len=max_len,
                )  # fmt: skip
        self.rollout_engine = engine
        # An engine built from this model starts in sync unless it says otherwise (``in_sync``: servers
        # given by URL hold unknown weights); an injected one may hold other weights.
        self._rollout_synced_step = 0 if getattr(engine, "in_sync", self._owns_rollout_engine) else -1
        # TRL gates its importance-sampling correction (and the sampling log-probs it needs) on use_vllm.
        # "server" keeps TRL's tool loop from reading its own colocated engine; the shim serves the
        # sync TRL triggers for custom rollout_funcs.
        self.use_vllm = True
        self.vllm_mode = "server"
        self.vllm_generation = _EngineSync(self)
        self._last_loaded_step = -1
        if self.min_p or self.repetition_penalty != 1.0 or self.args.generation_kwargs:
            logger.warning("rollout.backend %s ignores min_p, repetition_penalty and generation_kwargs",
                           self.rollout_args.rollout_backend)  # fmt: skip
        self._check_async_rollouts()

    def sync_rollout_weights(self) -> None:
        """Push the current weights to the engine when ``rollout.sync_every`` optimizer steps have passed
        (or it never received them). Between syncs the samples are off-policy by a few steps, which TRL's
        importance-sampling correction accounts for."""
        step, synced = self.state.global_step, self._rollout_synced_step
        if synced >= 0 and step - synced < self.rollout_args.rollout_sync_every:
            return
        rollouts = self._rollout_pipeline()
        if rollouts is None:
            self._push_rollout_weights()
        else:  # with generations running ahead: once the running one is done
            rollouts.sync(self._push_rollout_weights, version=step)
        self._rollout_synced_step = step

    def _push_rollout_weights(self) -> None:
        shared = self.rollout_args.rollout_backend == "vllm_server"
        # Under ZeRO-3 and FSDP2 each process holds a shard: every process takes part in gathering the
        # full parameters (a collective), after which the push reads them without communicating.
        model = self.accelerator.unwrap_model(self.model_wrapped)
        failure = None
        with profiling_context(self, "rollout.sync_weights"), full_parameters(model):
            # Server workers are shared by all processes: one push, the others wait for it.
            if not shared or self.accelerator.is_main_process:
                try:
                    self.rollout_engine.sync_weights(model)
                except RolloutUnavailable as error:
                    failure = str(error)
        if shared:
            from accelerate.utils import broadcast_object_list

            self.accelerator.wait_for_everyone()
            failure = broadcast_object_list([failure])[0]  # every process stops (and checkpoints) together
        if failure is not None:
            self._stop_for_lost_rollouts(failure)

    def _reattach_rollout_engine(self) -> None:
        if self.rollout_engine is None and getattr(self, "_owns_rollout_engine", False):
            self._attach_rollout_engine(None)  # train() closed it; a later train() or eval needs it again

    def _rollout_sampling(self) -> SamplingConfig:
        # TRL already repeats each prompt num_generations times: one sample per entry.
        return SamplingConfig(
            n=1, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0,
            max_tokens=self.max_completion_length,
        )  # fmt: skip

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        self._reattach_rollout_engine()
        if self.rollout_engine is None:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if images is not None and any(images):
            raise NotImplementedError("qalign rollout engines take text prompts only")
        rollouts = self._rollout_pipeline()
        with profiling_context(self, "rollout.generate"):
            try:
                if rollouts is not None:  # sampled ahead (rollout.async_steps); syncs only if it samples now
                    batch = self._take_async_rollouts(rollouts, prompt_ids)
                    return batch.completion_ids, batch.logprobs
                self.sync_rollout_weights()
                groups = self.rollout_engine.generate([list(p) for p in prompt_ids], self._rollout_sampling())
            except RolloutUnavailable as error:
                self._stop_for_lost_rollouts(str(error))
        return [g[0].completion_ids for g in groups], [g[0].logprobs for g in groups]

    def _stop_for_lost_rollouts(self, reason: str) -> NoReturn:
        """Every rollout worker is gone: checkpoint the last finished step (so that nothing trained is lost)
        and stop with an error that says what to resume from.

        Called at a step boundary (generation and the weight push come before the step's update), so the
        checkpoint holds exactly ``global_step`` finished steps; under several processes every process gets
        here together (generation fails on each, the push's failure is broadcast)."""
        step = self.state.global_step
        checkpoint = Path(self.args.output_dir) / f"checkpoint-{step}"
        if step == 0:
            raise RolloutUnavailable(f"{reason}; no training step had finished: rerun once the workers are up")
        if not checkpoint.exists():
            self._save_checkpoint(self.model, trial=None)
        raise RolloutUnavailable(
            f"{reason}; {checkpoint} holds the {step} finished step(s): restart the workers and rerun with "
            "--resume_from_checkpoint true"
        )

    # ------------------------------------------------------------------ SFT anchor (args.sft_coef)

    def _local_sequence_rewards(self, count: int) -> torch.Tensor:
        """This process's ``count`` summed rewards of the latest scoring call (gathered by
        ``GatheredRewardsMixin``); a completion no reward function scored counts as reward 0."""
        rewards_per_func = self._gathered_rewards_per_func
        rewards = summed_rewards(rewards_per_func, self.reward_weights)
        rewards = rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), 0.0)
        start = self.accelerator.process_index * count
        return rewards[start : start + count]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.sft_coef > 0:  # the anchor's successes, row by row (dynamic sampling keeps them aligned)
            output["sft_rewards"] = self._local_sequence_rewards(output["completion_mask"].size(0)).float()
        return output

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self.args.sft_coef <= 0:
            return loss
        anchor = self._sft_anchor(model, inputs)
        mode = "train" if self.model.training else "eval"
        # Logged as the mean over the processes whose micro-batch had successes: every process joins the
        # gather (each calls this once per micro-batch), and all of them log the same value.
        local = torch.zeros(1, 2, device=loss.device)  # (NLL, 1) where this micro-batch had successes, else 0s
        if anchor is not None:
            local[0, 0], local[0, 1] = anchor.detach(), 1.0
        totals = self.accelerator.gather(local).sum(dim=0)
        if totals[1] > 0:
            self._metrics[mode]["grpo/sft_nll"].append((totals[0] / totals[1]).item())
        if anchor is None:
            return loss
        # TRL's loss is already divided over the accumulation window (loss_is_scaled_for_ga); so is this term.
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        return loss + self.args.sft_coef * anchor / accumulation

    def _sft_anchor(self, model, inputs) -> torch.Tensor | None:
        """The anchor's NLL on this micro-batch's successful completions, or None when it has none.

        TRL's forward gives log-probs of temperature-scaled logits (the sampler's), so the anchor runs its own
        forward, on the successful rows only, for ln π_θ itself, as online ShiQ's anchor does."""
        success = inputs["sft_rewards"] > self.args.sft_reward_threshold
        if not bool(success.any()):
            return None
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        rows = {key: inputs[key][success] for key in keys}
        action_mask = policy_token_mask(inputs)[success]
        stats = completion_token_stats(model, rows)
        rewards = inputs["sft_rewards"][success].unsqueeze(1)
        return success_nll(stats.logprobs, rewards, action_mask.bool(), self.args.sft_reward_threshold)

    def close_rollout_engine(self) -> None:
        """Release an engine this trainer built (servers, vLLM memory); injected ones are left alone. Generation
        running ahead (``rollout.async_steps``) is stopped first, whoever owns the engine."""
        self._close_async_rollouts()
        if self.rollout_engine is not None and self._owns_rollout_engine:
            self.rollout_engine.close()
            self.rollout_engine = None

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.close_rollout_engine()


class _EngineSync:
    """Stands in for TRL's ``vllm_generation`` where TRL only asks it to sync (custom ``rollout_func``)."""

    def __init__(self, trainer: GRPOTrainer):
        self._trainer = trainer

    def sync_weights(self) -> None:
        self._trainer.sync_rollout_weights()
