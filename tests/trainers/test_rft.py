"""RFTTrainer on the tiny model: which rollouts reach training, the exact labels and loss SFT sees, that
training lowers the kept completions' NLL, LoRA, the qalign.train path, and the config/data errors.

The tiny rollouts (``tiny_rollouts``: 4 prompts x 2 samples x 6 tokens, all stopped by length) carry the
dense digit-share reward; their 8 rewards are 0.111, 0, 0.167, 0.357, 0, 0.125, 0.154, 0.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from datasets import Dataset

from qalign.data.rollouts import load_rollouts
from qalign.models import load_model, load_tokenizer
from qalign.trainers.rft import RFTConfig, RFTTrainer
from tests.conftest import REPO_ROOT
from tests.trainers.helpers import write_collect_yaml


def tiny_args(output_dir, **overrides) -> RFTConfig:
    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=8, max_steps=1, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
                  reward_threshold=0.15)  # fmt: skip
    kwargs.update(overrides)
    return RFTConfig(**kwargs)


def make_trainer(model_dir, rollouts, output_dir, **overrides) -> RFTTrainer:
    return RFTTrainer(model=load_model(str(model_dir)), args=tiny_args(output_dir, **overrides),
                      train_dataset=rollouts, processing_class=load_tokenizer(str(model_dir)))  # fmt: skip


@torch.no_grad()
def completion_nll(model, rows) -> float:
    """Mean NLL over every completion token of ``rows``, one unpadded sequence at a time."""
    model.eval()
    total, count = 0.0, 0
    for row in rows:
        prompt, completion = list(row["prompt_ids"]), list(row["completion_ids"])
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
        # completion token t sits at position P + t and is predicted by the logits at P + t - 1
        logprobs = logits[len(prompt) - 1 : -1].log_softmax(dim=-1)
        total -= logprobs.gather(-1, torch.tensor(completion).unsqueeze(-1)).sum().item()
        count += len(completion)
    return total / count


@pytest.mark.parametrize(("threshold", "kept"), [(0.15, 3), (0.125, 4), (float("-inf"), 8)])
def test_only_rollouts_at_or_above_the_threshold_reach_training(
    tiny_model_dir, tiny_rollouts, tmp_path, caplog, threshold, kept
):
    """0.125 is one rollout's exact reward: it is kept (>=, not >). Rows reach SFT as the sampled ids."""
    rollouts = load_rollouts(str(tiny_rollouts))
    with caplog.at_level("INFO", logger="qalign.trainers.rft"):
        trainer = make_trainer(tiny_model_dir, rollouts, tmp_path, reward_threshold=threshold,
                               rollouts_path=str(tiny_rollouts))  # fmt: skip
    assert len(trainer.train_dataset) == kept
    expected = [r["prompt_ids"] + r["completion_ids"] for r in rollouts if r["reward"] >= threshold]
    assert trainer.train_dataset["input_ids"] == expected
    assert f"rft: training on {kept} of 8 rollouts from {tiny_rollouts} (reward >= {threshold:g})" in caplog.text

    # The first collated batch: the prompt masked, every completion token a label, -100 on padding.
    rows = [trainer.train_dataset[i] for i in range(kept)]
    batch = trainer.data_collator(rows)
    kept_rollouts = [r for r in rollouts if r["reward"] >= threshold]
    width = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in kept_rollouts)
    labels = [[-100] * len(r["prompt_ids"]) + r["completion_ids"] for r in kept_rollouts]
    assert batch["labels"].tolist() == [row + [-100] * (width - len(row)) for row in labels]


def test_labels_of_hand_built_rollouts(tiny_model_dir, tmp_path):
    """Exact ids, the EOS the policy sampled kept as a label, an environment token (action_mask 0) and the
    prompt masked, a below-threshold row dropped; completion_only_loss=False puts the prompt back in."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rollouts = Dataset.from_list([
        {"prompt_ids": [5, 6, 7], "completion_ids": [10, 11, eos], "action_mask": [1, 1, 1], "reward": 1.0},
        {"prompt_ids": [8, 9], "completion_ids": [30, 31], "action_mask": [1, 1], "reward": 0.0},
        {"prompt_ids": [8, 9, 20], "completion_ids": [12, 13, 14, 15], "action_mask": [1, 0, 1, 1], "reward": 1.0},
    ])  # fmt: skip
    trainer = make_trainer(tiny_model_dir, rollouts, tmp_path / "a", reward_threshold=1.0)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 10, 11, eos, pad], [8, 9, 20, 12, 13, 14, 15]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 10, 11, eos, -100], [-100, -100, -100, 12, -100, 14, 15]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]

    # The loss is the token mean over the 6 labelled tokens (3 + 3), not a mean of per-sequence means.
    model = trainer.model
    with torch.no_grad():
        loss = trainer.compute_loss(model, {k: v.clone() for k, v in batch.items()})
        logprobs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    picked = [(0, 2, 10), (0, 3, 11), (0, 4, eos), (1, 2, 12), (1, 4, 14), (1, 5, 15)]  # (row, position, token)
    hand = -sum(logprobs[b, t, token].item() for b, t, token in picked) / len(picked)
    assert loss.item() == pytest.approx(hand, rel=1e-5)

    full = make_trainer(tiny_model_dir, rollouts, tmp_path / "b", reward_threshold=1.0, completion_only_loss=False)
    assert full.train_dataset["labels"] == [[5, 6, 7, 10, 11, eos], [8, 9, 20, 12, 13, 14, 15]]


def test_step_zero_loss_is_the_mean_nll_of_the_kept_completions(tiny_model_dir, tiny_rollouts, tmp_path):
    rollouts = load_rollouts(str(tiny_rollouts))
    kept = [r for r in rollouts if r["reward"] >= 0.15]
    hand = completion_nll(load_model(str(tiny_model_dir)), kept)
    everything = completion_nll(load_model(str(tiny_model_dir)), list(rollouts))
    trainer = make_trainer(tiny_model_dir, rollouts, tmp_path, max_steps=1)
    trainer.train()
    step0 = trainer.state.log_history[0]["loss"]
    assert step0 == pytest.approx(hand, rel=1e-5)
    assert abs(step0 - everything) > 1e-3  # the rejected rollouts would give another number


def test_training_lowers_the_nll_of_the_kept_completions(tiny_model_dir, tiny_rollouts, tmp_path):
    rollouts = load_rollouts(str(tiny_rollouts))
    kept = [r for r in rollouts if r["reward"] >= 0.15]
    before = completion_nll(load_model(str(tiny_model_dir)), kept)
    trainer = make_trainer(tiny_model_dir, rollouts, tmp_path, max_steps=5)
    trainer.train()
    after = completion_nll(trainer.model, kept)
    assert after < before - 1.0, (before, after)


def test_lora_trains_only_the_adapter(tiny_model_dir, tiny_rollouts, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = RFTTrainer(model=load_model(str(tiny_model_dir)), args=tiny_args(tmp_path, max_steps=2),
                         train_dataset=load_rollouts(str(tiny_rollouts)), peft_config=lora,
                         processing_class=load_tokenizer(str(tiny_model_dir)))  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_qalign_train_collects_then_runs_rft(tiny_model_dir, tmp_path, capsys, caplog):
    """`qalign.train` on configs/rft_demo.yaml (tiny model, tiny collection): collect, filter, train, save,
    before/after line; the saved model is the trained one."""
    from qalign.train import main

    collect_yaml = write_collect_yaml(tmp_path / "collect.yaml", tiny_model_dir, tmp_path / "rollouts")
    with caplog.at_level("INFO", logger="qalign.trainers.rft"):
        result = main([
            "--config", str(REPO_ROOT / "configs" / "rft_demo.yaml"), "--algorithm", "rft",
            "--model_name_or_path", str(tiny_model_dir), "--prompt_template", "plain", "--eval_samples", "4",
            "--rollouts_path", str(tmp_path / "rollouts"), "--collect_config", str(collect_yaml),
            "--reward_threshold", "0.15", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
            "--learning_rate", "1e-2", "--max_completion_length", "8", "--save_strategy", "no",
        ])  # fmt: skip
    assert (tmp_path / "rollouts" / "shard-00000.parquet").is_file()
    assert f"rft: training on 3 of 8 rollouts from {tmp_path / 'rollouts'}" in caplog.text
    assert set(result) == {"before", "after"}
    assert re.search(r"^before: \d\.\d{3} after: \d\.\d{3}$", capsys.readouterr().out, re.MULTILINE)
    saved, initial = load_model(str(tmp_path / "out")), load_model(str(tiny_model_dir))
    assert not torch.equal(saved.lm_head.weight, initial.lm_head.weight)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf")])
def test_bad_threshold_is_a_one_line_config_error(tmp_path, threshold):
    message = f"reward_threshold must be a finite number or -inf (a rollout is kept when its reward >= " \
              f"reward_threshold), got {threshold}"  # fmt: skip
    with pytest.raises(ValueError) as error:
        RFTConfig(output_dir=str(tmp_path), reward_threshold=threshold)
    assert str(error.value) == message

    from qalign.train_config import parse_config

    # The command line is checked before TRL loads (qalign.preflight), with its own one-line wording.
    early = f"reward_threshold: {threshold} is out of range; a finite number, or -inf to keep every rollout"
    with pytest.raises(ValueError, match=re.escape(early)):
        parse_config(["--algorithm", "rft", "--output_dir", str(tmp_path), "--reward_threshold", str(threshold)])


def test_text_only_sft_options_are_refused(tmp_path):
    with pytest.raises(ValueError) as error:
        RFTConfig(output_dir=str(tmp_path), assistant_only_loss=True)
    assert str(error.value) == ("assistant_only_loss=True does not apply to rft, which trains on the rollouts' "
                                "sampled token ids, not on text; valid: False")  # fmt: skip


def test_max_length_that_would_cut_kept_rollouts_is_refused(tmp_path):
    with pytest.raises(ValueError) as error:
        RFTConfig(output_dir=str(tmp_path), max_length=512, max_prompt_length=500, max_completion_length=32)
    assert str(error.value) == ("max_length=512 is below max_prompt_length + max_completion_length = 532; "
                                "valid: max_length >= 532 or None")  # fmt: skip
    assert RFTConfig(output_dir=str(tmp_path), max_length=532, max_prompt_length=500, max_completion_length=32)


def test_missing_rollouts_path_is_named(tiny_model_dir, tmp_path):
    from qalign.train_config import parse_config

    loaded = parse_config(["--algorithm", "rft", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"^RFTTrainer trains on offline rollouts: set rollouts_path"):
        RFTTrainer.from_qalign_config(loaded, load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)),
                                      None, None)  # fmt: skip


def test_no_kept_rollout_is_a_clear_error(tiny_model_dir, tiny_rollouts, tmp_path):
    rollouts = load_rollouts(str(tiny_rollouts))
    best = max(rollouts["reward"])
    assert math.isclose(best, 0.357, abs_tol=1e-3)
    with pytest.raises(ValueError) as error:
        make_trainer(tiny_model_dir, rollouts, tmp_path, reward_threshold=0.5, rollouts_path=str(tiny_rollouts))
    assert str(error.value) == (f"rft: no rollout in {tiny_rollouts} has reward >= 0.5; the best of its 8 is "
                                f"{best:g}: lower reward_threshold or collect more samples")  # fmt: skip
