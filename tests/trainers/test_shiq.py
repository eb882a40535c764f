"""ShiQTrainer end to end on the tiny model: rollouts collected through qalign.collect, a few steps,
parameters move (only the adapter under LoRA), and the qalign.train CLI path with automatic collection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qalign.data.rollouts import load_rollouts
from qalign.models import load_model, load_tokenizer
from qalign.trainers.shiq import ShiQConfig, ShiQTrainer
from tests.trainers.helpers import write_collect_yaml

def tiny_kwargs(output_dir, **overrides) -> dict:
    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", report_to="none", seed=0, beta=0.1,
                  max_completion_length=8, dataloader_num_workers=0)  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_shiq_trains_on_collected_rollouts(tiny_model_dir, tiny_rollouts, tmp_path):
    dataset = load_rollouts(str(tiny_rollouts))
    assert len(dataset) == 8 and sum(dataset["reward"]) > 0
    trainer = ShiQTrainer(model=load_model(str(tiny_model_dir)), args=ShiQConfig(**tiny_kwargs(tmp_path)),
                          train_dataset=dataset, processing_class=load_tokenizer(str(tiny_model_dir)))  # fmt: skip
    before = snapshot(trainer.model)
    trainer.train()
    changed = moved(trainer.model, before)
    assert "lm_head.weight" in changed and len(changed) == len(before), sorted(set(before) - changed)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all("shiq/residual_rms" in log for log in logs)
    assert logs[0]["loss"] > 0


def test_shiq_lora_trains_only_the_adapter(tiny_model_dir, tiny_rollouts, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = ShiQTrainer(model=load_model(str(tiny_model_dir)), args=ShiQConfig(**tiny_kwargs(tmp_path)),
                          train_dataset=load_rollouts(str(tiny_rollouts)), peft_config=lora,
                          processing_class=load_tokenizer(str(tiny_model_dir)))  # fmt: skip
    before = snapshot(trainer.model)
    trainer.train()
    changed = moved(trainer.model, before)
    assert changed and all("lora_" in n for n in changed), sorted(changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_text_rollouts_are_tokenized_and_get_reference_stats(tiny_model_dir, tmp_path):
    """A plain (prompt, completion, reward) dataset: tokenized, EOS appended, π_ref statistics computed once."""
    from datasets import Dataset

    data = Dataset.from_list([
        {"prompt": "What is 2 + 3?\n", "completion": " 5", "reward": 1.0},
        {"prompt": "What is 4 times 2?\n", "completion": " 6", "reward": 0.0},
    ])  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_model_dir))
    trainer = ShiQTrainer(model=load_model(str(tiny_model_dir)), args=ShiQConfig(**tiny_kwargs(tmp_path, max_steps=1)),
                          train_dataset=data, processing_class=tokenizer)  # fmt: skip
    rows = trainer.train_dataset
    assert rows[0]["completion_ids"][-1] == tokenizer.eos_token_id
    assert rows[0]["rewards"][-1] == 1.0 and sum(rows[0]["rewards"]) == 1.0
    assert len(rows[0]["ref_lse"]) == len(rows[0]["completion_ids"])
    trainer.train()


@pytest.mark.slow
def test_qalign_train_collects_then_trains_shiq(tiny_model_dir, tmp_path, capsys):
    """`python -m qalign.train` with algorithm shiq: the collect step runs first, then training, then the
    before/after line."""
    from qalign.train import main

    collect_yaml = write_collect_yaml(tmp_path / "collect.yaml", tiny_model_dir, tmp_path / "rollouts")
    result = main([
        "--algorithm", "shiq", "--model_name_or_path", str(tiny_model_dir), "--prompt_template", "plain",
        "--reward_funcs", "accuracy_last_number", "--eval_samples", "4",
        "--rollouts_path", str(tmp_path / "rollouts"), "--collect_config", str(collect_yaml),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--max_completion_length", "8", "--save_strategy", "no", "--report_to", "none", "--beta", "0.1",
    ])  # fmt: skip
    assert (tmp_path / "rollouts" / "shard-00000.parquet").is_file()
    assert set(result) == {"before", "after"}
    assert "before: " in capsys.readouterr().out


def test_shiq_online_samples_and_trains(tiny_model_dir, tmp_path):
    """Online ShiQ: GRPOTrainer's generation path samples, the ShiQ loss trains; the reference
    statistics come from TRL's frozen reference, and at step 1 (policy = reference) ln ρ = 0."""
    from qalign.trainers.shiq import ShiQOnlineConfig, ShiQOnlineTrainer
    from tests.trainers.helpers import digit_fraction_reward, tiny_grpo_kwargs, tiny_prompt_dataset

    args = ShiQOnlineConfig(**tiny_grpo_kwargs(tmp_path, beta=0.1))
    trainer = ShiQOnlineTrainer(
        model=load_model(str(tiny_model_dir)), reward_funcs=[digit_fraction_reward], args=args,
        train_dataset=tiny_prompt_dataset(), processing_class=load_tokenizer(str(tiny_model_dir)),
    )  # fmt: skip
    assert trainer.ref_model is not None
    before = snapshot(trainer.model)
    trainer.train()
    assert "lm_head.weight" in moved(trainer.model, before)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and logs[0]["loss"] > 0
    assert logs[0]["shiq/log_ratio"] == pytest.approx(0.0, abs=1e-5) and logs[0]["reward"] > 0
