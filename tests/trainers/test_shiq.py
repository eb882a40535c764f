"""ShiQTrainer end to end on the tiny model: rollouts collected through qalign.collect, a few steps,
parameters move (only the adapter under LoRA), and the qalign.train CLI path with automatic collection."""

from __future__ import annotations

import contextlib

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
    card = (tmp_path / "out" / "README.md").read_text()  # ShiQ's own card, not TRL's or none
    assert "Trained with **ShiQ** ([arXiv 2505.11081]" in card and "| `beta` | `0.1` |" in card


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


def _independent_token_stats(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """ln π(a_t|s_t) and LSE(s_t) per completion token from one plain forward over the whole sequence
    (positions counted over real tokens, as generation does)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0)).logits
    logits = logits[:, inputs["prompt_ids"].size(1) - 1 : -1].float()
    lse = logits.logsumexp(dim=-1)
    return logits.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1) - lse, lse


@pytest.mark.parametrize("lora", [False, True], ids=["ref_model", "lora"])
def test_shiq_online_runs_one_reference_forward_per_step(tiny_model_dir, tmp_path, lora):
    """TRL's own reference forward (only ln π_ref of the sampled tokens) is skipped: π_ref runs once per step,
    over the whole generation batch, and the loss is ShiQ's loss on statistics recomputed here."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from qalign.losses.shiq import shiq_loss
    from qalign.trainers.shiq import ShiQOnlineConfig, ShiQOnlineTrainer
    from tests.trainers.helpers import digit_fraction_reward, tiny_grpo_kwargs, tiny_prompt_dataset

    args = ShiQOnlineConfig(**tiny_grpo_kwargs(tmp_path, beta=0.1))
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None
    trainer = ShiQOnlineTrainer(
        model=load_model(str(tiny_model_dir)), reward_funcs=[digit_fraction_reward], args=args,
        train_dataset=tiny_prompt_dataset(), processing_class=load_tokenizer(str(tiny_model_dir)),
        peft_config=peft_config,
    )  # fmt: skip
    if lora:  # π_ref is the base model with the adapter disabled
        assert trainer.ref_model is None
        base = trainer.model.get_base_model()
        lora_layer = next(m for m in base.modules() if isinstance(m, BaseTunerLayer))
        reference, is_reference_call = base, lambda: lora_layer.disable_adapters
        adapter_off = trainer.model.disable_adapter
    else:
        reference, is_reference_call = trainer.ref_model, lambda: True
        adapter_off = contextlib.nullcontext

    counting = {"on": True}
    calls: list[tuple[int, int]] = []  # (global step, rows) of every reference forward the trainer runs

    def count(module, module_args, kwargs):
        if counting["on"] and is_reference_call():
            ids = kwargs.get("input_ids", module_args[0] if module_args else None)
            calls.append((trainer.state.global_step, ids.size(0)))

    handle = reference.register_forward_pre_hook(count, with_kwargs=True)
    compute_loss = trainer._compute_loss
    checked: list[tuple[torch.Tensor, torch.Tensor]] = []
    trl_reference: list[bool] = []  # whether TRL's own reference log-probs reached the loss

    def checking_loss(model, inputs):
        loss = compute_loss(model, inputs)
        counting["on"] = False  # the forwards below are the test's, not the trainer's
        with torch.no_grad():
            with adapter_off():
                ref_logprobs, ref_lse = _independent_token_stats(reference, inputs)
            logprobs, lse = _independent_token_stats(model, inputs)
        counting["on"] = True
        trl_reference.append("ref_per_token_logps" in inputs)
        torch.testing.assert_close(inputs["ref_logprobs"], ref_logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(inputs["ref_lse"], ref_lse, rtol=0, atol=1e-5)
        expected, _ = shiq_loss(
            logprobs, lse, ref_logprobs, ref_lse, inputs["rewards"], inputs["action_mask"].bool(), beta=0.1,
            gamma=1.0, residual="multi_step", normalizer="sequence", max_length=args.max_completion_length,
        )  # fmt: skip
        checked.append((loss.detach(), expected))
        return loss

    trainer._compute_loss = checking_loss
    try:
        trainer.train()
    finally:
        handle.remove()
    rows = args.per_device_train_batch_size  # one generation batch per step (steps_per_generation = 1)
    assert calls == [(0, rows), (1, rows)]
    assert trl_reference == [False, False]
    assert len(checked) == 2
    for loss, expected in checked:
        assert loss.item() > 0
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", ["ShiQConfig", "DQOConfig", "ShiQOnlineConfig"])
def test_every_token_loss_config_refuses_bad_beta_and_normalizer_alike(tmp_path, config):
    """One check, run where the config is built: the offline and online configs refuse the same values
    with the same messages (the pure losses no longer re-check them)."""
    import qalign.trainers.dqo as dqo
    import qalign.trainers.shiq as shiq
    from tests.trainers.helpers import tiny_grpo_kwargs

    cls = getattr(dqo, config, None) or getattr(shiq, config)
    kwargs = tiny_grpo_kwargs(tmp_path) if config == "ShiQOnlineConfig" else tiny_kwargs(tmp_path)
    with pytest.raises(ValueError, match=r"^beta must be > 0 \(it is the KL temperature\), got 0$"):
        cls(**{**kwargs, "beta": 0})
    with pytest.raises(ValueError, match=r"^loss_normalizer must be 'sequence', 'token' or 'constant', got 'mean'$"):
        cls(**{**kwargs, "beta": 0.1, "loss_normalizer": "mean"})


def test_sft_anchor_adds_exactly_its_term(tiny_model_dir, tiny_rollouts):
    """sft_coef = λ adds λ × success_nll to the ShiQ loss of the same batch, and nothing else."""
    from qalign.data.rollouts import RolloutCollator, load_rollouts
    from qalign.losses.anchor import success_nll
    from qalign.models import load_model
    from qalign.trainers.offline import completion_token_stats
    from qalign.trainers.shiq import ShiQConfig, shiq_batch_loss

    rows = load_rollouts(str(tiny_rollouts)).select(range(4))
    batch = RolloutCollator(0)([rows[i] for i in range(4)])
    assert (batch["rewards"].sum(dim=1) > 0).any(), "the anchor needs a successful sample in the batch"
    model = load_model(str(tiny_model_dir)).eval()
    plain, _ = shiq_batch_loss(model, batch, ShiQConfig(output_dir="unused", beta=0.1, use_cpu=True))
    anchored, metrics = shiq_batch_loss(model, batch, ShiQConfig(output_dir="unused", beta=0.1, sft_coef=0.5,
                                                                 use_cpu=True))  # fmt: skip
    stats = completion_token_stats(model, batch)
    expected = success_nll(stats.logprobs, batch["rewards"], batch["action_mask"].bool())
    assert anchored.item() == pytest.approx(plain.item() + 0.5 * expected.item(), rel=1e-6)
    assert metrics["shiq/sft_nll"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="sft_coef must be >= 0"):
        ShiQConfig(output_dir="unused", sft_coef=-1.0, use_cpu=True)


def test_shiq_online_sft_anchor_adds_exactly_its_term(tiny_model_dir, tmp_path):
    """Online ShiQ's sft_coef = λ adds λ × the NLL of the generation batch's successful samples, as offline."""
    import copy

    from qalign.losses.anchor import success_nll
    from qalign.trainers.offline import completion_token_stats
    from qalign.trainers.shiq import ShiQOnlineConfig, ShiQOnlineTrainer, shiq_batch_loss
    from tests.trainers.helpers import digit_fraction_reward, tiny_grpo_kwargs, tiny_prompt_dataset

    # The dense test reward is > 0 for most samples: a threshold of 0.05 makes only some of them "successes".
    args = ShiQOnlineConfig(**tiny_grpo_kwargs(tmp_path, beta=0.1, sft_coef=2.0, sft_reward_threshold=0.05))
    trainer = ShiQOnlineTrainer(
        model=load_model(str(tiny_model_dir)), reward_funcs=[digit_fraction_reward], args=args,
        train_dataset=tiny_prompt_dataset(), processing_class=load_tokenizer(str(tiny_model_dir)),
    )  # fmt: skip
    compute_loss, checked = trainer._compute_loss, []
    plain_args = copy.copy(args)  # dataclasses.replace would rerun TRL's __post_init__ on derived fields
    plain_args.sft_coef = 0.0

    def checking_loss(model, inputs):
        assert "sft_rewards" not in inputs  # GRPO's anchor column; ShiQ's anchor reads the token rewards
        loss = compute_loss(model, inputs)
        with torch.no_grad():
            plain, _ = shiq_batch_loss(model, inputs, plain_args)
            stats = completion_token_stats(model, inputs)
            nll = success_nll(stats.logprobs, inputs["rewards"], inputs["action_mask"].bool(), 0.05)
        checked.append((loss.item(), plain.item(), nll.item()))
        return loss

    trainer._compute_loss = checking_loss
    trainer.train()
    assert checked and any(nll > 0 for *_, nll in checked), "some sample should pass the threshold"
    for loss, plain, nll in checked:
        assert loss == pytest.approx(plain + 2.0 * nll, rel=1e-5, abs=1e-6)
    assert all("shiq/sft_nll" in log for log in trainer.state.log_history if "loss" in log)
    with pytest.raises(ValueError, match="sft_coef must be >= 0"):
        ShiQOnlineConfig(**tiny_grpo_kwargs(tmp_path, sft_coef=-1.0))
