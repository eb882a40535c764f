"""Shared machinery of the offline token-level Bellman trainers (ShiQ, DQO): config fields, the
one-time reference pass, and a ``transformers.Trainer`` whose ``compute_loss`` delegates to one
``batch_loss`` hook, the way TRL's DPOTrainer is built. The collator and the per-token statistics of
a forward pass live in ``qalign.data.rollouts`` (re-exported here), which the collection
(``qalign.data.collection``) uses without importing the Trainer stack.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, get_args

import torch
from transformers import Trainer, TrainingArguments

from qalign.data.rollouts import (
    RolloutCollator,
    TokenStats,
    completion_token_stats,
    load_rollouts,
    model_inputs,
    normalize_rollouts,
    reference_stats,
)
from qalign.distributed import guard_interpreter_exit
from qalign.losses.shiq import Normalizer
from qalign.trainers.device import apply_device_defaults, token_mean_across_processes
from qalign.trainers.model_card import ModelCardMixin
from qalign.trainers.saving import LoadableFinalSaveMixin
from qalign.trainers.sft_anchor import SFTAnchorConfig

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "OfflineConfig", "OfflineTrainer", "RolloutCollator", "TokenStats", "add_reference_stats",
    "completion_token_stats", "model_inputs", "reference_stats", "unwrap_base",
]  # fmt: skip


@dataclass
class OfflineConfig(TrainingArguments, SFTAnchorConfig):
    """TrainingArguments plus what every offline token-level trainer needs: the rollout dataset, how to
    collect it when it is missing, the KL weight β, the discount γ and the loss normaliser."""

    rollouts_path: str | None = field(
        default=None,
        metadata={
            "help": "Offline rollouts: a folder of parquet shards written by `python -m qalign.collect`, a "
            "local .parquet/.jsonl file or a hub dataset id with (prompt, completion, reward) columns."
        },
    )
    rollouts_split: str = field(default="train", metadata={"help": "Split of a file/hub rollout dataset."})
    collect_config: str | None = field(
        default=None,
        metadata={
            "help": "A `qalign.collect` YAML: run first (on the main process) to create or finish "
            "rollouts_path. Collection resumes, so a finished dataset costs nothing."
        },
    )
    beta: float = field(default=0.1, metadata={"help": "KL weight β of J = E[Σ r − β KL(π‖π_ref)]; > 0."})
    gamma: float = field(default=1.0, metadata={"help": "Discount γ per policy token (1 for LLMs)."})
    loss_normalizer: str = field(
        default="sequence",
        metadata={
            "help": "How per-token squared residuals are averaged: 'sequence' (mean per sequence, then over "
            "sequences), 'token' (mean over all action tokens of the batch) or 'constant' "
            "(sum / (batch · max_completion_length))."
        },
    )
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Rollouts with longer prompts are dropped (None: keep all)."}
    )
    max_completion_length: int = field(
        default=256,
        metadata={
            "help": "Rollouts with longer completions are dropped; also the budget of the before/after "
            "evaluation in `qalign.train`."
        },
    )
    ref_batch_size: int = field(
        default=16, metadata={"help": "Batch size of the one-time reference pass for rollouts that lack ref stats."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator reads the rollout columns itself."}
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Set every dropout to 0: with dropout the trained policy would differ from the stored "
            "reference even at the start, and the Bellman residuals would be noisy."
        },
    )

    def __post_init__(self) -> None:
        apply_device_defaults(self)
        super().__post_init__()
        check_token_loss_args(self.beta, self.loss_normalizer)
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        self.check_sft_anchor_args()


def check_token_loss_args(beta: float, loss_normalizer: str) -> None:
    """The checks every config of a token-level loss (ShiQ, DQO, offline or online) runs when it is built.
    They run here only: the pure losses trust their arguments, so a bad value fails at config time with a
    message naming the key, not mid-training."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (it is the KL temperature), got {beta}")
    if loss_normalizer not in get_args(Normalizer):
        raise ValueError(f"loss_normalizer must be 'sequence', 'token' or 'constant', got {loss_normalizer!r}")


def add_reference_stats(dataset: Dataset, model: torch.nn.Module, pad_token_id: int, batch_size: int) -> Dataset:
    """Fill ``ref_logprobs``/``ref_lse`` once, before training (2 floats per token), where missing."""
    if {"ref_logprobs", "ref_lse"} <= set(dataset.column_names):
        return dataset
    logger.info("computing reference log-probs and log-sum-exps for %d rollouts (once)", len(dataset))
    rows = dataset.select_columns(["prompt_ids", "completion_ids"]).to_list()
    stats = reference_stats(model, rows, pad_token_id, batch_size)
    dataset = dataset.add_column("ref_logprobs", [s["ref_logprobs"] for s in stats])
    return dataset.add_column("ref_lse", [s["ref_lse"] for s in stats])


# ----------------------------------------------------------------------------- trainer


def unwrap_base(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying transformers model: through DDP/compile wrappers and a PEFT wrapper."""
    while hasattr(model, "module"):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class OfflineTrainer(ModelCardMixin, LoadableFinalSaveMixin, Trainer):
    """A ``transformers.Trainer`` over rollout datasets whose loss is ``batch_loss(model, inputs)``.

    Subclasses set ``_tag_names`` and implement ``batch_loss``; they may override ``_prepare_model``
    (e.g. to attach a value function before PEFT wraps the model). Rollouts missing the reference
    statistics get them from ``ref_model`` or, by default, from the model itself before training
    (adapters disabled under PEFT), i.e. π_ref is the starting policy.
    """

    # compute_loss returns a per-micro-batch mean: let Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False
    _tag_names: list[str] = ["qalign"]

    def __init__(
        self,
        model: torch.nn.Module | str,
        args: OfflineConfig,
        train_dataset: Dataset,
        processing_class=None,
        eval_dataset: Dataset | None = None,
        peft_config=None,
        ref_model: torch.nn.Module | None = None,
        callbacks=None,
        optimizers=(None, None),
    ):
        from qalign.models import load_model, load_tokenizer

        if isinstance(model, str):
            model = load_model(model)
        if processing_class is None:
            processing_class = load_tokenizer(model.config.name_or_path)
        pad = processing_class.pad_token_id
        if pad is None:
            pad = processing_class.eos_token_id
        model = self._prepare_model(model, args, peft_config)

        def prepare(data):
            return None if data is None else self._prepare_rollouts(data, model, ref_model, processing_class, pad, args)

        super().__init__(
            model=model,
            args=args,
            data_collator=RolloutCollator(pad),
            train_dataset=prepare(train_dataset),
            eval_dataset=prepare(eval_dataset),
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if self.accelerator.num_processes > 1:
            guard_interpreter_exit()
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------ construction hooks

    def _prepare_model(self, model: torch.nn.Module, args: OfflineConfig, peft_config) -> torch.nn.Module:
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
                # Attention dropout is a float the attention function reads, not a Dropout module.
                if isinstance(getattr(module, "attention_dropout", None), float):
                    module.attention_dropout = 0.0
        return model

    @staticmethod
    def _prepare_rollouts(dataset, model, ref_model, tokenizer, pad: int, args: OfflineConfig) -> Dataset:
        dataset = normalize_rollouts(dataset, tokenizer, args.max_prompt_length, args.max_completion_length)
        if {"ref_logprobs", "ref_lse"} <= set(dataset.column_names):
            return dataset
        if ref_model is not None:
            return add_reference_stats(dataset, ref_model, pad, args.ref_batch_size)
        import contextlib

        # A fresh LoRA adapter is exactly zero, but disabling it makes "π_ref = base model" explicit.
        context = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with context:
            return add_reference_stats(dataset, model, pad, args.ref_batch_size)

    @classmethod
    def from_qalign_config(cls, loaded, model, tokenizer, train_dataset, reward_funcs):
        """Build from ``qalign.train``'s parsed config: collect the rollouts first if asked, then load them.

        ``train_dataset`` (prompts) and ``reward_funcs`` are not used: offline rollouts carry their rewards.
        """
        from accelerate import PartialState
        from trl import get_peft_config

        args = loaded.training
        if args.rollouts_path is None:
            raise ValueError(f"{cls.__name__} trains on offline rollouts: set rollouts_path (and collect_config "
                             "to collect them with `qalign.collect` when missing)")  # fmt: skip
        if args.collect_config:
            state = PartialState()
            if state.is_main_process:
                from qalign.data.collection import collect_from_yaml

                collect_from_yaml(args.collect_config, output_dir=args.rollouts_path)
            state.wait_for_everyone()
        dataset = load_rollouts(args.rollouts_path, args.rollouts_split)
        return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                   peft_config=get_peft_config(loaded.model))  # fmt: skip

    # ------------------------------------------------------------------ loss and logging

    def batch_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, detached scalar metrics) of one micro-batch."""
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.batch_loss(model, inputs)
        if self.args.loss_normalizer == "token":
            loss = token_mean_across_processes(loss, inputs["action_mask"].sum(), self.accelerator)
        mode = "train" if self.model.training else "eval"
        if metrics:
            names = sorted(metrics)
            values = torch.stack([metrics[n].detach().float() for n in names]).to(loss.device)
            values = self.accelerator.gather(values.unsqueeze(0)).mean(dim=0)
            for name, value in zip(names, values.tolist()):
                self._metrics[mode][name].append(value)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        averaged = {name: sum(v) / len(v) for name, v in self._metrics[mode].items() if v}
        if mode == "eval":
            averaged = {f"eval_{name}": value for name, value in averaged.items()}
        super().log({**logs, **averaged}, start_time)
        self._metrics[mode].clear()
