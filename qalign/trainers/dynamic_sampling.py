"""DAPO's dynamic sampling for the GRPO family (Yu et al., "DAPO", arXiv 2503.14476).

Prompt groups whose rewards are all equal have zero advantage and give no policy gradient: they are
dropped and the generation batch is refilled with groups of further training prompts, until every
process holds a full batch of groups with signal or ``dynamic_sampling_max_rounds`` extra rounds are
spent. ``DynamicSamplingMixin`` hooks this into TRL's ``GRPOTrainer`` (qalign's ``GRPOTrainer`` uses it);
the functions below are the row bookkeeping it needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch

from qalign.trainers.gathered_rewards import summed_rewards
from qalign.trainers.policy_tokens import policy_token_mask

logger = logging.getLogger(__name__)


class DynamicSamplingMixin:
    """``args.dynamic_sampling`` runs, in place of TRL's one call to ``_generate_and_score_completions`` per
    generation batch, up to 1 + ``dynamic_sampling_max_rounds`` calls (the first on the dataloader's
    prompts, the others on prompts drawn from the training set) and keeps the groups whose gathered
    rewards differ. Each call is the whole hook chain (QAE's baseline, ShiQ's token rewards), so the kept
    rows carry the values that hook gave them. The rewards are read from ``GatheredRewardsMixin``, which
    must come after this mixin in the trainer's bases (as in qalign's ``GRPOTrainer``)."""

    _refill_dataset = None  # the prompt source of refill rounds, built on first use

    def _check_dynamic_sampling_dataset(self) -> None:
        dataset = self.train_dataset
        if dataset is None or isinstance(dataset, (torch.utils.data.IterableDataset, datasets.IterableDataset)):
            kind = "none" if dataset is None else type(dataset).__name__
            raise ValueError(f"dynamic_sampling draws refill prompts by index: it needs a map-style train_dataset, "
                             f"got {kind}")  # fmt: skip

    def _prepare_inputs(self, generation_batch):
        if not (getattr(self.args, "dynamic_sampling", False) and self.model.training):
            return super()._prepare_inputs(generation_batch)
        # TRL's _prepare_inputs decides when to generate and then shuffles, splits and buffers the result. To
        # keep all of that, its one call to the hook is pointed at the dynamic-sampling loop for this call
        # only; the loop calls the hook as it was (a subclass's override, or an instance-level wrapper).
        had_own = "_generate_and_score_completions" in self.__dict__
        score = self._generate_and_score_completions
        self._generate_and_score_completions = lambda inputs: self._dynamically_sample(inputs, score)
        try:
            return super()._prepare_inputs(generation_batch)
        finally:
            if had_own:
                self._generate_and_score_completions = score
            else:
                del self._generate_and_score_completions

    def _dynamically_sample(self, inputs: list[dict], score: Callable[[list[dict]], dict]) -> dict[str, Any]:
        """Generation rounds until every process holds ``len(inputs)`` rows of groups with signal (or the
        rounds run out); returns them in the format of ``_generate_and_score_completions``."""
        generations = self.num_generations
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        local_rows = len(inputs)
        needed = local_rows // generations  # groups per process
        kept = torch.zeros(world, dtype=torch.long)  # groups with signal each process holds so far
        parts, reserve = [], None
        sampled_groups = dropped_groups = 0
        for round_index in range(1 + self.args.dynamic_sampling_max_rounds):
            if round_index:
                inputs = self._refill_inputs(round_index, local_rows)
            self._gathered_rewards_per_func = None  # set again by this round's scoring, or the check fails
            output = score(inputs)
            if self._gathered_rewards_per_func is None:
                raise RuntimeError("dynamic_sampling needs the rewards of _calculate_rewards, which was not called")
            unsupported = _PER_IMAGE_KEYS.intersection(output)
            if unsupported:
                raise NotImplementedError(
                    f"dynamic_sampling supports text prompts only (the batch has {sorted(unsupported)})"
                )
            # Decided on the gathered rewards, so every process reaches the same verdicts and runs the
            # same number of rounds (each round has collectives: reward gathering, token counts).
            signal = groups_with_signal(
                self._gathered_rewards_per_func, self.reward_weights, generations, self.multi_objective_aggregation
            ).cpu().view(world, needed)  # fmt: skip
            sampled_groups += signal.numel()
            dropped_groups += int((~signal).sum())
            mine = signal[rank].nonzero().flatten()[: needed - int(kept[rank])]
            if mine.numel():
                parts.append(select_rows(output, group_rows(mine, generations)))
            if round_index == 0:
                # The first round's dropped groups alone cover any shortfall: kept ≥ its signal groups.
                reserve = (output, (~signal[rank]).nonzero().flatten())
            kept += torch.minimum(signal.sum(dim=1), needed - kept)
            if bool((kept == needed).all()):
                break
        shortfall = needed - int(kept[rank])
        if shortfall:
            parts.append(select_rows(reserve[0], group_rows(reserve[1][:shortfall], generations)))
        missing = int((needed - kept).sum())
        if missing and self.accelerator.is_main_process:
            logger.warning(
                "dynamic_sampling: %d of %d groups still without reward signal after %d generation rounds "
                "(dynamic_sampling_max_rounds=%d); training on the batch completed with zero-advantage groups",
                missing, world * needed, round_index + 1, self.args.dynamic_sampling_max_rounds,
            )  # fmt: skip
        batch = concat_rows(parts, self._tokenizer.pad_token_id)
        batch["num_items_in_batch"] = self.accelerator.gather(policy_token_mask(batch).sum()).sum()

        metrics = self._metrics["train"]
        metrics["dynamic_sampling/dropped_fraction"].append(dropped_groups / sampled_groups)
        metrics["dynamic_sampling/rounds"].append(float(round_index + 1))
        metrics["dynamic_sampling/zero_signal_fraction"].append(missing / (world * needed))
        total = self._sampled_completions() + sampled_groups * generations
        self.state.stateful_callbacks[_SAMPLED_KEY] = {"args": {}, "attributes": {"sampled_completions": total}}
        metrics["dynamic_sampling/sampled_completions"] = [float(total)]  # a running total, like TRL's num_tokens
        return batch

    def _sampled_completions(self) -> int:
        # Kept in the TrainerState, which checkpoints save and resuming restores, so a resumed run's total
        # still charges every completion sampled before the interruption.
        entry = self.state.stateful_callbacks.get(_SAMPLED_KEY, {})
        return int(entry.get("attributes", {}).get("sampled_completions", 0))

    def _refill_inputs(self, round_index: int, local_rows: int) -> list[dict]:
        """This process's rows of refill round ``round_index`` (≥ 1): a generation batch's worth of prompts,
        each repeated ``num_generations`` times and laid out across processes as TRL's sampler does."""
        if self._refill_dataset is None:
            dataset = self.train_dataset
            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            self._refill_dataset = dataset
        dataset = self._refill_dataset
        prompts = self.args.generation_batch_size // self.num_generations
        # One permutation per generation batch, seeded by its place in training (not by a running
        # counter), so every process draws the same prompts and a resumed run draws what it would have.
        micro_step = self._step % self.current_gradient_accumulation_steps
        order = np.random.default_rng([self.args.seed, self.state.global_step, micro_step]).permutation(len(dataset))
        start = (round_index - 1) * prompts
        indices = [int(order[(start + i) % len(order)]) for i in range(prompts)]
        # Separate dicts per row: TRL writes rollout fields into each row.
        rows = [dict(dataset[index]) for index in indices for _ in range(self.num_generations)]
        rank = self.accelerator.process_index
        return rows[rank * local_rows : (rank + 1) * local_rows]


_SAMPLED_KEY = "QAlignDynamicSampling"  # its entry in TrainerState.stateful_callbacks (saved in checkpoints)

# Rows of a multimodal batch are not independent of these (pixel values go per image, token types span prompt
# and completion), so dynamic sampling cannot select and re-pad them row by row.
_PER_IMAGE_KEYS = frozenset({
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes", "token_type_ids",
    "mm_token_type_ids", "image_position_ids", "num_images", "num_tiles",
})  # fmt: skip
_PROMPT_SIDE = frozenset({"prompt_ids", "prompt_mask"})  # left-padded; every other 2-D tensor is right-padded


def groups_with_signal(
    rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int, aggregation: str
) -> torch.Tensor:
    """Which groups of ``num_generations`` consecutive completions have rewards that are not all equal.

    ``rewards_per_func`` is (completions, reward functions), NaN where a function did not score. With
    ``sum_then_normalize`` the group's advantages come from the weighted sum (NaN if no function scored,
    as in TRL), so that sum must vary; with ``normalize_then_sum`` any one function varying suffices.
    NaN entries are ignored: a group with fewer than two scored completions has no signal.
    """
    if aggregation == "sum_then_normalize":
        values = summed_rewards(rewards_per_func, reward_weights).unsqueeze(1)
    else:
        values = rewards_per_func
    grouped = values.view(-1, num_generations, values.size(1))
    missing = torch.isnan(grouped)
    highest = grouped.masked_fill(missing, -torch.inf).amax(dim=1)
    lowest = grouped.masked_fill(missing, torch.inf).amin(dim=1)
    return (highest > lowest).any(dim=1)


def group_rows(groups: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Row indices of the given groups, each group's ``num_generations`` rows in order."""
    return (groups.unsqueeze(1) * num_generations + torch.arange(num_generations)).flatten()


def select_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The given rows of every per-row entry of a scored batch (tensors and lists); scalars are kept."""
    selected = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            selected[key] = value[rows.to(value.device)]
        elif isinstance(value, list):
            selected[key] = [value[i] for i in rows.tolist()]
        else:
            selected[key] = value
    return selected


def concat_rows(parts: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stack scored batches row-wise. Sequences of different widths are padded as TRL pads them: prompts on
    the left, completions and per-token values on the right (token ids with ``pad_token_id``, ``tool_mask``
    and importance-sampling ratios with 1, everything else with 0). ``num_items_in_batch`` is left out: it
    counts tokens over all processes and has to be recomputed."""
    pad_values = {"prompt_ids": pad_token_id, "completion_ids": pad_token_id, "tool_mask": 1,
                  "importance_sampling_ratio": 1.0}  # fmt: skip
    batch = {}
    for key, first in parts[0].items():
        values = [part[key] for part in parts]
        if key == "num_items_in_batch" or first is None:
            continue
        if isinstance(first, list):
            batch[key] = [item for value in values for item in value]
        elif isinstance(first, torch.Tensor) and first.ndim == 1:
            batch[key] = torch.cat(values)
        elif isinstance(first, torch.Tensor) and first.ndim == 2:
            width = max(value.size(1) for value in values)
            left = key in _PROMPT_SIDE
            padded = []
            for value in values:
                gap = width - value.size(1)
                padding = (gap, 0) if left else (0, gap)
                padded.append(torch.nn.functional.pad(value, padding, value=pad_values.get(key, 0)))
            batch[key] = torch.cat(padded)
        else:
            raise NotImplementedError(f"dynamic_sampling cannot stack batch entry {key!r} ({type(first).__name__})")
    return batch
