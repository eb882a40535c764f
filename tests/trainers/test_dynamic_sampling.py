"""DAPO dynamic sampling on GRPOConfig (inherited by QAE and online ShiQ): groups with all-equal rewards
are dropped, the batch is refilled from further prompts, the rounds are capped, every sample is counted."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

from qalign.models import load_model, load_tokenizer
from qalign.trainers.dynamic_sampling import concat_rows, groups_with_signal
from qalign.trainers.grpo import GRPOConfig, GRPOTrainer
from qalign.trainers.qae import QAEConfig, QAETrainer
from tests.trainers.helpers import tiny_grpo_kwargs, tiny_prompt_dataset

GROUP = 4  # tiny_grpo_kwargs: num_generations 4, 8 completions per step → 2 groups per generation batch
ONE_STD = torch.tensor([0.0, 1.0, 0.0, 1.0]).std().item()  # std of a group scored 0, 1, 0, 1


def scripted_reward(always_one: str):
    """Deterministic rewards that ignore the completion: the completions of an "always" prompt all score 1
    (no signal); the others score 0, 1, 0, 1 by position in their group. ``always_one``: "first_batch"
    (the prompts of the first call, so step 1 must refill), "all" or "none". ``reward.calls`` records
    (global step, prompts) per call, i.e. per generation round."""
    always: set[str] = set()

    def reward(prompts, completions, trainer_state, **kwargs) -> list[float]:
        if always_one == "first_batch" and not reward.calls:
            always.update(prompts)
        reward.calls.append((trainer_state.global_step, list(prompts)))
        if always_one == "all":
            return [1.0] * len(prompts)
        return [1.0 if p in always else float(i % 2) for i, p in enumerate(prompts)]

    reward.calls = []
    reward.always = always
    return reward


def make_trainer(trainer_cls, config, model_dir, reward, **kwargs):
    return trainer_cls(
        model=load_model(str(model_dir)),
        reward_funcs=[reward],
        args=config,
        train_dataset=kwargs.pop("train_dataset", tiny_prompt_dataset()),
        processing_class=load_tokenizer(str(model_dir)),
        **kwargs,
    )


def capture_loss_inputs(trainer) -> list[dict]:
    """Every micro-batch the loss receives (one per step here: steps_per_generation is 1)."""
    seen = []
    original = trainer._compute_loss

    def wrapped(model, inputs):
        seen.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        return original(model, inputs)

    trainer._compute_loss = wrapped
    return seen


def trained_prompts(batch, tokenizer) -> list[str]:
    return [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]


def logged(trainer, key) -> list[float]:
    return [log[key] for log in trainer.state.log_history if key in log]


def test_groups_with_signal_exact():
    nan = torch.nan
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], [nan, 0.0, 0.0, nan], [nan, 2.0, nan, nan],
                            [nan, nan, nan, nan], [0.0, 0.0, 0.0, 1e-7]]).reshape(-1, 1)  # fmt: skip
    weights = torch.ones(1)
    expected = [False, True, False, False, False, True]
    assert groups_with_signal(rewards, weights, 4, "sum_then_normalize").tolist() == expected
    assert groups_with_signal(rewards, weights, 4, "normalize_then_sum").tolist() == expected
    # Two functions that vary in opposite directions: their weighted sum is constant (zero GRPO advantage),
    # but with normalize_then_sum each function is normalised on its own, so the group has signal.
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert groups_with_signal(two, torch.ones(2), 2, "sum_then_normalize").tolist() == [False]
    assert groups_with_signal(two, torch.ones(2), 2, "normalize_then_sum").tolist() == [True]
    assert groups_with_signal(two, torch.tensor([1.0, 0.5]), 2, "sum_then_normalize").tolist() == [True]


def test_concat_rows_pads_like_trl():
    first = {"prompt_ids": torch.tensor([[5, 6]]), "prompt_mask": torch.tensor([[1, 1]]),
             "completion_ids": torch.tensor([[7]]), "completion_mask": torch.tensor([[1]]),
             "tool_mask": torch.tensor([[1]]), "advantages": torch.tensor([0.5]),
             "importance_sampling_ratio": torch.tensor([[0.9]]), "num_items_in_batch": torch.tensor(1)}  # fmt: skip
    second = {"prompt_ids": torch.tensor([[8]]), "prompt_mask": torch.tensor([[1]]),
              "completion_ids": torch.tensor([[9, 3]]), "completion_mask": torch.tensor([[1, 1]]),
              "tool_mask": torch.tensor([[1, 0]]), "advantages": torch.tensor([-0.5]),
              "importance_sampling_ratio": torch.tensor([[1.1, 1.2]]), "num_items_in_batch": torch.tensor(2)}  # fmt: skip
    batch = concat_rows([first, second], pad_token_id=0)
    assert batch["prompt_ids"].tolist() == [[5, 6], [0, 8]]
    assert batch["prompt_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["completion_ids"].tolist() == [[7, 0], [9, 3]]
    assert batch["completion_mask"].tolist() == [[1, 0], [1, 1]]
    assert batch["tool_mask"].tolist() == [[1, 1], [1, 0]]
    assert torch.equal(batch["importance_sampling_ratio"], torch.tensor([[0.9, 1.0], [1.1, 1.2]]))
    assert batch["advantages"].tolist() == [0.5, -0.5]
    assert "num_items_in_batch" not in batch  # a count over all processes: the trainer recomputes it


@pytest.mark.parametrize("algorithm", ["grpo", "qae"])
def test_dropped_groups_never_reach_the_loss_and_the_batch_is_refilled(tiny_model_dir, tmp_path, algorithm):
    reward = scripted_reward("first_batch")
    kwargs = tiny_grpo_kwargs(tmp_path, dynamic_sampling=True, dynamic_sampling_max_rounds=20)
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (QAEConfig, QAETrainer)
    trainer = make_trainer(trainer_cls, config_cls(**kwargs), tiny_model_dir, reward)
    batches = capture_loss_inputs(trainer)
    trainer.train()

    assert len(batches) == 2
    total_calls = 0
    for step, batch in enumerate(batches):
        calls = [prompts for call_step, prompts in reward.calls if call_step == step]
        groups = [prompts[i] for prompts in calls for i in range(0, len(prompts), GROUP)]
        with_signal = [p for p in groups if p not in reward.always]
        # The loop stops at the round that completed the batch: the 2 groups needed come from the last call.
        assert len([p for p in groups[: -(len(calls[-1]) // GROUP)] if p not in reward.always]) < 2 <= len(with_signal)
        # (b) full size, (a) exactly the first groups with signal in sampling order, none of the "always" ones.
        assert batch["advantages"].numel() == 8
        prompts = trained_prompts(batch, trainer.processing_class)
        assert Counter(prompts) == Counter(p for p in with_signal[:2] for _ in range(GROUP))
        assert not reward.always.intersection(prompts)
        if algorithm == "grpo":  # (r − mean)/(std + 1e-4) for rewards 0, 1, 0, 1
            expected = sorted([-0.5 / (ONE_STD + 1e-4)] * 4 + [0.5 / (ONE_STD + 1e-4)] * 4)
        else:  # K = 0.4 quantile of 0, 0, 1, 1 is 0: (r − 0)/(std + 1e-4)
            expected = sorted([0.0] * 4 + [1.0 / (ONE_STD + 1e-4)] * 4)
        assert sorted(batch["advantages"].tolist()) == pytest.approx(expected, abs=1e-6)

        log = next(entry for entry in trainer.state.log_history if entry.get("step") == step + 1 and "loss" in entry)
        total_calls += len(calls)
        assert log["dynamic_sampling/rounds"] == len(calls)
        assert log["dynamic_sampling/dropped_fraction"] == pytest.approx(1 - len(with_signal) / len(groups))
        assert log["dynamic_sampling/sampled_completions"] == 8 * total_calls
        assert log["dynamic_sampling/zero_signal_fraction"] == 0.0
    # Step 1 began with the "always" prompts only: at least one refill round was needed.
    assert logged(trainer, "dynamic_sampling/rounds")[0] >= 2


def test_round_cap_trains_on_what_there_is_and_counts_every_sample(tiny_model_dir, tmp_path, caplog):
    reward = scripted_reward("all")
    kwargs = tiny_grpo_kwargs(tmp_path / "run", dynamic_sampling=True, dynamic_sampling_max_rounds=2,
                              save_strategy="steps", save_steps=1)  # fmt: skip
    trainer = make_trainer(GRPOTrainer, GRPOConfig(**kwargs), tiny_model_dir, reward)
    batches = capture_loss_inputs(trainer)
    with caplog.at_level(logging.WARNING, logger="qalign.trainers.grpo"):
        trainer.train()

    assert len(reward.calls) == 6  # (c) 1 + 2 rounds per step, no more
    assert logged(trainer, "dynamic_sampling/rounds") == [3.0, 3.0]
    assert logged(trainer, "dynamic_sampling/dropped_fraction") == [1.0, 1.0]
    assert logged(trainer, "dynamic_sampling/zero_signal_fraction") == [1.0, 1.0]
    assert logged(trainer, "dynamic_sampling/sampled_completions") == [24.0, 48.0]
    warnings = [r.getMessage() for r in caplog.records if "dynamic_sampling_max_rounds=2" in r.getMessage()]
    assert len(warnings) == 2 and "2 of 2 groups" in warnings[0]
    for step, batch in enumerate(batches):
        # Completed with the first round's (zero-advantage) groups: the dataloader's prompts for that step.
        first_round = next(prompts for call_step, prompts in reward.calls if call_step == step)
        assert Counter(trained_prompts(batch, trainer.processing_class)) == Counter(first_round)
        assert batch["advantages"].tolist() == [0.0] * 8

    # The running total lives in the checkpointed TrainerState: a resumed run goes on counting from it.
    resumed = make_trainer(GRPOTrainer, GRPOConfig(**kwargs), tiny_model_dir, scripted_reward("all"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert logged(resumed, "dynamic_sampling/sampled_completions")[-1] == 48.0


def test_with_signal_everywhere_dynamic_sampling_changes_nothing(tiny_model_dir, tmp_path):
    runs = {}
    for enabled in (False, True):
        config = GRPOConfig(**tiny_grpo_kwargs(tmp_path / str(enabled), dynamic_sampling=enabled))
        trainer = make_trainer(GRPOTrainer, config, tiny_model_dir, scripted_reward("none"))
        trainer.train()
        runs[enabled] = trainer
    assert logged(runs[True], "loss") == logged(runs[False], "loss")
    for (name, mine), (_, reference) in zip(runs[True].model.named_parameters(), runs[False].model.named_parameters()):
        assert torch.equal(mine, reference), name
    assert logged(runs[True], "dynamic_sampling/rounds") == [1.0, 1.0]
    assert logged(runs[True], "dynamic_sampling/dropped_fraction") == [0.0, 0.0]
    assert not logged(runs[False], "dynamic_sampling/rounds")  # off: no extra metrics


def test_online_shiq_keeps_its_per_token_rows_aligned(tiny_model_dir, tmp_path):
    """ShiQOnlineConfig inherits the option; its extra per-token entries are selected and padded with the rows."""
    from qalign.trainers.shiq import ShiQOnlineConfig, ShiQOnlineTrainer

    reward = scripted_reward("first_batch")
    kwargs = tiny_grpo_kwargs(tmp_path, beta=0.1, max_steps=1, dynamic_sampling=True, dynamic_sampling_max_rounds=20)
    trainer = make_trainer(ShiQOnlineTrainer, ShiQOnlineConfig(**kwargs), tiny_model_dir, reward)
    batches = capture_loss_inputs(trainer)
    trainer.train()
    (batch,) = batches
    assert not reward.always.intersection(trained_prompts(batch, trainer.processing_class))
    width = batch["completion_ids"].size(1)
    for key in ("rewards", "action_mask", "ref_logprobs", "ref_lse"):
        assert batch[key].shape == (8, width), key
    # One sequence reward per completion, on its last policy token: 0, 1, 0, 1 per group.
    assert sorted(batch["rewards"].sum(dim=1).tolist()) == [0.0] * 4 + [1.0] * 4
    assert float((batch["rewards"] * (1 - batch["action_mask"])).abs().sum()) == 0.0


@pytest.mark.parametrize("config_cls", [GRPOConfig, QAEConfig])
@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_max_rounds_fails_at_config_time(tmp_path, config_cls, bad):
    with pytest.raises(ValueError) as error:
        config_cls(**tiny_grpo_kwargs(tmp_path, dynamic_sampling=True, dynamic_sampling_max_rounds=bad))
    assert str(error.value) == (
        f"dynamic_sampling_max_rounds must be an integer >= 1 (extra generation rounds), got {bad!r}"
    )


def test_bad_flag_and_iterable_dataset_are_rejected(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="dynamic_sampling must be true or false, got 'yes'"):
        GRPOConfig(**tiny_grpo_kwargs(tmp_path, dynamic_sampling="yes"))
    config = GRPOConfig(**tiny_grpo_kwargs(tmp_path, dynamic_sampling=True))
    stream = tiny_prompt_dataset(8).to_iterable_dataset()
    with pytest.raises(ValueError, match="needs a map-style train_dataset, got IterableDataset"):
        make_trainer(GRPOTrainer, config, tiny_model_dir, scripted_reward("none"), train_dataset=stream)
