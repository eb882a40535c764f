"""RFT: rejection-sampling fine-tuning, TRL's SFTTrainer on the policy's own rewarded samples.

The baseline every offline value-based method must beat: it reads the same offline rollouts as
ShiQ/DQO (``rollouts_path``, collected by ``qalign.collect`` when ``collect_config`` asks), keeps the
rollouts whose reward is at least ``reward_threshold`` and maximises their likelihood — the
prompt-masked NLL of TRL's prompt-completion SFT, nothing else changed. With a 0/1 verifier and
threshold 1 this is STaR / RAFT-style "fine-tune on your own correct answers".

The rows are handed to SFTTrainer pre-tokenised: ``input_ids`` = ``prompt_ids + completion_ids`` exactly
as sampled (the prompt as rendered and tokenised at collection time, the completion's EOS included
when the policy stopped), and ``completion_mask`` marks the policy's tokens. Re-tokenising the decoded
text instead would train on sequences the policy never produced: byte-level BPE does not round-trip
a completion cut mid-character (``'�'``), and tokens can merge across the prompt/completion boundary.

Example::

    from qalign.data.rollouts import load_rollouts
    from qalign.trainers.rft import RFTConfig, RFTTrainer

    trainer = RFTTrainer(
        model="path/or/hub-id",
        args=RFTConfig(output_dir="out", reward_threshold=1.0, num_train_epochs=1),
        train_dataset=load_rollouts("outputs/rollouts/arithmetic"),
    )
    trainer.train()
"""

from __future__ import annotations

import logging
import math
from dataclasses import Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import trl

from qalign.data.rollouts import normalize_rollouts
from qalign.distributed import guard_interpreter_exit
from qalign.trainers.device import apply_device_defaults
from qalign.trainers.model_card import ModelCardMixin
from qalign.trainers.offline import OfflineConfig, OfflineTrainer
from qalign.trainers.saving import LoadableFinalSaveMixin

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_OFFLINE_FIELDS = {f.name: f for f in fields(OfflineConfig)}


def _as_in_offline_config(name: str) -> Field:
    """OfflineConfig's field ``name`` (default and help): RFT must read and filter the rollouts exactly as
    ShiQ/DQO do, or the comparison would not be on the same data."""
    source = _OFFLINE_FIELDS[name]
    return field(default=source.default, metadata=dict(source.metadata))


# SFTConfig options for text datasets. RFT's rows are token ids fixed at collection time, so these could
# only be accepted and ignored (or, for eos_token, silently change the stop token the evaluation uses
# while the training data keep the sampled one): refused instead. Values are the only valid ones.
_TEXT_ONLY_OPTIONS: dict[str, Any] = {
    "dataset_text_field": "text", "assistant_only_loss": False, "eos_token": None, "chat_template_path": None,
}  # fmt: skip


@dataclass
class RFTConfig(trl.SFTConfig):
    """TRL's SFTConfig (every SFT/transformers field under its own name) plus the offline rollouts, read as
    ``OfflineConfig`` reads them, and the reward threshold that selects the rollouts to imitate."""

    rollouts_path: str | None = _as_in_offline_config("rollouts_path")
    rollouts_split: str = _as_in_offline_config("rollouts_split")
    collect_config: str | None = _as_in_offline_config("collect_config")
    max_prompt_length: int | None = _as_in_offline_config("max_prompt_length")
    max_completion_length: int = _as_in_offline_config("max_completion_length")
    reward_threshold: float = field(
        default=1.0,
        metadata={
            "help": "A rollout is trained on when its reward (the 'reward' column, else the sum of 'rewards') "
            "is >= this; 1.0 keeps the correct answers of a 0/1 verifier, -inf keeps every rollout."
        },
    )
    completion_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Loss on the policy's completion tokens only (the prompt and environment tokens are "
            "masked); False trains on the prompt tokens too."
        },
    )

    def __post_init__(self) -> None:
        if math.isnan(self.reward_threshold) or self.reward_threshold == math.inf:
            raise ValueError(f"reward_threshold must be a finite number or -inf (a rollout is kept when its reward "
                             f">= reward_threshold), got {self.reward_threshold}")  # fmt: skip
        for key, valid in _TEXT_ONLY_OPTIONS.items():
            if getattr(self, key) != valid:
                raise ValueError(f"{key}={getattr(self, key)!r} does not apply to rft, which trains on the rollouts' "
                                 f"sampled token ids, not on text; valid: {valid!r}")  # fmt: skip
        longest = None if self.max_prompt_length is None else self.max_prompt_length + self.max_completion_length
        if self.max_length is not None and longest is not None and longest > self.max_length:
            # SFT truncates to max_length: it would cut the end (answer, EOS) off rollouts that the length
            # limits let through and the offline trainers train on whole.
            raise ValueError(f"max_length={self.max_length} is below max_prompt_length + max_completion_length = "
                             f"{longest}; valid: max_length >= {longest} or None")  # fmt: skip
        # TRL reads None as "completion-only for prompt-completion text columns"; RFT's rows are token ids
        # without those columns, so None would silently train on the prompts.
        if self.completion_only_loss is None:
            self.completion_only_loss = True
        apply_device_defaults(self)
        super().__post_init__()


def rollout_rewards(rollouts: Dataset) -> list[float]:
    """The sequence reward of each rollout: the ``reward`` column, else the sum of the per-token ``rewards``."""
    if "reward" in rollouts.column_names:
        return [float(r) for r in rollouts["reward"]]
    if "rewards" in rollouts.column_names:
        return [float(sum(r)) for r in rollouts["rewards"]]
    raise ValueError(f"rft: a rollout dataset needs a 'reward' or 'rewards' column to filter on, "
                     f"got {sorted(rollouts.column_names)}")  # fmt: skip


def rft_dataset(
    rollouts: Dataset, tokenizer: PreTrainedTokenizerBase, args: RFTConfig, source: str = "the rollout dataset"
) -> Dataset:
    """The rollouts with reward >= ``args.reward_threshold`` as TRL's pre-tokenised prompt-completion rows.

    Each row is ``input_ids`` = prompt ids + completion ids as sampled, and ``completion_mask`` = 0 on the
    prompt, the rollout's ``action_mask`` on the completion (environment tokens of multi-turn rollouts are
    context, not something to imitate). Text-only rollouts are tokenised and length-filtered by
    ``normalize_rollouts`` with the offline trainers' limits, so RFT trains on the same rows they would.
    """
    total = len(rollouts)
    rewards = rollout_rewards(rollouts)
    keep = [i for i, reward in enumerate(rewards) if reward >= args.reward_threshold]
    if not keep:
        best = max(rewards, default=float("nan"))
        raise ValueError(f"rft: no rollout in {source} has reward >= {args.reward_threshold}; the best of its "
                         f"{total} is {best:g}: lower reward_threshold or collect more samples")  # fmt: skip
    tokens = normalize_rollouts(rollouts.select(keep), tokenizer, args.max_prompt_length, args.max_completion_length)

    def to_sft(row: dict[str, Any]) -> dict[str, list[int]]:
        prompt, completion = list(row["prompt_ids"]), list(row["completion_ids"])
        mask = [0] * len(prompt) + [1 if m else 0 for m in row["action_mask"]]
        return {"input_ids": prompt + completion, "completion_mask": mask}

    data = tokens.map(to_sft, remove_columns=tokens.column_names, num_proc=args.dataset_num_proc)
    if args.process_index == 0:
        too_long = len(keep) - len(data)
        extra = f"; {too_long} more over max_prompt_length/max_completion_length" if too_long else ""
        logger.info("rft: training on %d of %d rollouts from %s (reward >= %g%s)",
                    len(data), total, source, args.reward_threshold, extra)  # fmt: skip
    return data


class RFTTrainer(ModelCardMixin, LoadableFinalSaveMixin, trl.SFTTrainer):
    """TRL's SFTTrainer on the rewarded rollouts of an offline rollout dataset.

    ``train_dataset`` (and ``eval_dataset``) are rollout datasets (``load_rollouts``, or any
    prompt/completion/reward dataset ``normalize_rollouts`` reads); they are filtered by
    ``args.reward_threshold`` and turned into SFT rows here, and the rest is SFTTrainer unchanged: loss,
    LoRA through ``peft_config``, checkpoints, accelerate/DeepSpeed.
    """

    _tag_names = ["trl", "sft", "qalign", "rft"]
    _method = "rft"

    def __init__(
        self,
        model: torch.nn.Module | str,
        args: RFTConfig,
        train_dataset: Dataset,
        processing_class: PreTrainedTokenizerBase | None = None,
        eval_dataset: Dataset | None = None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        from qalign.models import load_tokenizer, resolve_model_path

        if isinstance(model, str):
            # SFTTrainer loads it (so args.model_init_kwargs apply); qalign's aliases are resolved first.
            model = resolve_model_path(model)
        if processing_class is None:
            processing_class = load_tokenizer(model if isinstance(model, str) else model.config.name_or_path)
        source = args.rollouts_path or "train_dataset"
        train = rft_dataset(train_dataset, processing_class, args, source)
        evaluation = None if eval_dataset is None else rft_dataset(eval_dataset, processing_class, args, "eval_dataset")
        super().__init__(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if self.accelerator.num_processes > 1:
            guard_interpreter_exit()

    @classmethod
    def from_qalign_config(cls, loaded, model, tokenizer, train_dataset, reward_funcs) -> RFTTrainer:
        """Build from ``qalign.train``'s parsed config exactly as the offline trainers are built: collect the
        rollouts first if ``collect_config`` asks (on the main process), load ``rollouts_path`` /
        ``rollouts_split``, LoRA from ``get_peft_config(loaded.model)``. Their code is called rather than
        copied, so RFT and ShiQ/DQO cannot drift apart in what data they see.

        ``train_dataset`` (prompts) and ``reward_funcs`` are not used: the rollouts carry their rewards.
        """
        build = OfflineTrainer.from_qalign_config.__func__
        return build(cls, loaded, model, tokenizer, train_dataset, reward_funcs)
