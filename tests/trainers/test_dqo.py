"""DQOTrainer end to end on the tiny model: both value functions (head on the policy trunk, separate
trunk), LoRA on both, the value learning rate, and resume from a checkpoint with the value head."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from qalign.data.rollouts import load_rollouts
from qalign.models import load_model, load_tokenizer
from qalign.trainers.dqo import DQOConfig, DQOTrainer
from tests.trainers.test_shiq import moved, snapshot, tiny_kwargs


def make_trainer(model_dir, rollouts, output_dir, peft_config=None, callbacks=None, **overrides):
    args = DQOConfig(**tiny_kwargs(output_dir, **overrides))
    return DQOTrainer(model=load_model(str(model_dir)), args=args, train_dataset=load_rollouts(str(rollouts)),
                      processing_class=load_tokenizer(str(model_dir)), peft_config=peft_config,
                      callbacks=callbacks)  # fmt: skip


@pytest.mark.parametrize("value_function", ["head", "model"])
def test_dqo_trains_policy_and_value(tiny_model_dir, tiny_rollouts, tmp_path, value_function):
    trainer = make_trainer(tiny_model_dir, tiny_rollouts, tmp_path, value_function=value_function,
                           importance_sampling="cumulative", value_learning_rate=5e-2)  # fmt: skip
    before = snapshot(trainer.model)
    trainer.train()
    changed = moved(trainer.model, before)
    assert "lm_head.weight" in changed and "value_head.summary.weight" in changed
    assert any(n.startswith("model.layers.") for n in changed)
    if value_function == "model":
        assert any(n.startswith("value_trunk.layers.") for n in changed)
    # V_φ has its own optimizer parameter group at value_learning_rate.
    assert {group["initial_lr"] for group in trainer.optimizer.param_groups} == {1e-2, 5e-2}
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all({"dqo/policy_loss", "dqo/value_loss", "dqo/is_weight"} <= set(log) for log in logs)


@pytest.mark.parametrize("value_function", ["head", "model"])
def test_dqo_lora_trains_only_adapters_and_value_head(tiny_model_dir, tiny_rollouts, tmp_path, value_function):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(tiny_model_dir, tiny_rollouts, tmp_path, peft_config=lora, value_function=value_function)
    before = snapshot(trainer.model)
    trainer.train()
    changed = moved(trainer.model, before)
    assert changed and all("lora_" in n or "value_head.modules_to_save" in n for n in changed), sorted(changed)
    assert any("value_head.modules_to_save" in n for n in changed)
    if value_function == "model":
        assert any("value_trunk" in n and "lora_" in n for n in changed)
    # The adapter checkpoint carries the value head.
    trainer.save_model(str(tmp_path / "saved"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert any("value_head" in key for key in saved)


class CrashAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill right after the checkpoint")


def test_dqo_resume_restores_value_head_and_reaches_the_same_loss(tiny_model_dir, tiny_rollouts, tmp_path):
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
                  value_learning_rate=5e-2)  # fmt: skip
    reference = make_trainer(tiny_model_dir, tiny_rollouts, tmp_path / "full", **kwargs)
    reference.train()
    expected = {log["step"]: log["loss"] for log in reference.state.log_history if "loss" in log}

    crashing = make_trainer(tiny_model_dir, tiny_rollouts, tmp_path / "run", callbacks=[CrashAfterStep(2)], **kwargs)
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    resumed = make_trainer(tiny_model_dir, tiny_rollouts, tmp_path / "run", **kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    after = {log["step"]: log["loss"] for log in resumed.state.log_history if "loss" in log}
    assert after[3] == pytest.approx(expected[3], abs=1e-6)
    assert after[4] == pytest.approx(expected[4], abs=1e-6)
    head = lambda t: t.model.value_head.summary.weight
    assert torch.allclose(head(resumed), head(reference), atol=1e-6) and head(reference).abs().sum() > 0


def test_value_loss_trains_the_head_not_the_policy_trunk(tiny_model_dir, tiny_rollouts):
    """L_V is a loss in φ: with a head on the policy trunk its gradient must stop at the head."""
    from qalign.data.rollouts import RolloutCollator
    from qalign.trainers.dqo import attach_value_function, policy_stats_and_values

    model = attach_value_function(load_model(str(tiny_model_dir)), "head")
    rows = load_rollouts(str(tiny_rollouts)).select(range(2)).to_list()
    batch = RolloutCollator(load_tokenizer(str(tiny_model_dir)).pad_token_id)(rows)
    _, values = policy_stats_and_values(model, batch)
    assert values.shape == batch["completion_ids"].shape
    values.sum().backward()
    assert model.value_head.summary.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("value_head."))


@pytest.mark.parametrize("value_function", ["head", "model"])
def test_values_are_computed_inside_the_model_forward(tiny_model_dir, tiny_rollouts, value_function):
    """V_φ runs in the forward that DDP/DeepSpeed wrap, and equals the head applied to the right states."""
    from qalign.data.rollouts import RolloutCollator, model_inputs
    from qalign.trainers.dqo import attach_value_function, policy_stats_and_values

    model = attach_value_function(load_model(str(tiny_model_dir)), value_function)
    with torch.no_grad():
        model.value_head.summary.weight.normal_()
    rows = load_rollouts(str(tiny_rollouts)).select(range(3)).to_list()
    batch = RolloutCollator(load_tokenizer(str(tiny_model_dir)).pad_token_id)(rows)
    calls = []
    model.value_head.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    _, values = policy_stats_and_values(model, batch)
    assert len(calls) == 1
    # The same numbers computed by hand: the head on the last hidden state of s_t = the token before a_t.
    width_c = batch["completion_ids"].size(1)
    with torch.no_grad():
        trunk = model.value_trunk if value_function == "model" else model.get_decoder()
        hidden = trunk(**model_inputs(batch), use_cache=False).last_hidden_state[:, -width_c - 1 : -1]
        expected = model.value_head(hidden)
    assert torch.allclose(values.detach(), expected, atol=1e-5)
    # Outside policy_stats_and_values (generation, evaluation) the forward does not compute V_φ.
    calls.clear()
    with torch.no_grad():
        model(**model_inputs(batch))
    assert calls == []


def test_final_save_keeps_the_value_function_apart_so_the_folder_loads_as_a_plain_lm(
    tiny_model_dir, tiny_rollouts, tmp_path
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qalign.trainers.dqo import VALUE_FUNCTION_DIR

    trainer = make_trainer(tiny_model_dir, tiny_rollouts, tmp_path, max_steps=1)
    trainer.train()
    trained_head = trainer.model.value_head.summary.weight.detach().clone()
    trainer.save_model(str(tmp_path / "final"))
    lm = load_file(str(tmp_path / "final" / "model.safetensors"))
    value = load_file(str(tmp_path / "final" / VALUE_FUNCTION_DIR / "model.safetensors"))
    assert not any("value_" in name for name in lm), sorted(lm)
    assert torch.equal(value["value_head.summary.weight"], trained_head)
    # Loads with no unexpected keys (vLLM refuses a checkpoint holding parameters its architecture lacks).
    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"), output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info


def test_sft_anchor_adds_exactly_its_term_to_dqo(tiny_model_dir, tiny_rollouts):
    """DQO's sft_coef = λ adds λ × success_nll of the same forward's log-probs to L_π + c·L_V, and nothing else."""
    from qalign.data.rollouts import RolloutCollator
    from qalign.losses.anchor import success_nll
    from qalign.trainers.dqo import attach_value_function, dqo_batch_loss, policy_stats_and_values

    model = attach_value_function(load_model(str(tiny_model_dir)), "head").eval()
    rows = load_rollouts(str(tiny_rollouts)).select(range(4)).to_list()
    batch = RolloutCollator(load_tokenizer(str(tiny_model_dir)).pad_token_id)(rows)
    assert (batch["rewards"].sum(dim=1) > 0).any(), "the anchor needs a successful sample in the batch"
    plain, plain_metrics = dqo_batch_loss(model, batch, DQOConfig(**tiny_kwargs("unused")))
    anchored, metrics = dqo_batch_loss(model, batch, DQOConfig(**tiny_kwargs("unused", sft_coef=2.0)))
    stats, _ = policy_stats_and_values(model, batch)
    expected = success_nll(stats.logprobs, batch["rewards"], batch["action_mask"].bool())
    assert expected.item() > 0
    assert anchored.item() == pytest.approx(plain.item() + 2.0 * expected.item(), rel=1e-6)
    assert metrics["dqo/sft_nll"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert "dqo/sft_nll" not in plain_metrics
    with pytest.raises(ValueError, match="sft_coef must be >= 0"):
        DQOConfig(**tiny_kwargs("unused", sft_coef=-1.0))


def test_mean_return_counts_policy_actions_only_and_discounts_them():
    from datasets import Dataset

    from qalign.trainers.dqo import mean_return

    # Row 1: an environment token (mask 0) between two actions; the reward on the 2nd action is discounted once.
    rows = Dataset.from_list([{"rewards": [0.0, 5.0, 1.0], "action_mask": [1, 0, 1]},
                              {"rewards": [1.0], "action_mask": [1]}])  # fmt: skip
    assert mean_return(rows, gamma=0.5) == pytest.approx((0.5 + 1.0) / 2)
    assert mean_return(rows, gamma=1.0) == pytest.approx((1.0 + 1.0) / 2)


def test_value_init_mean_return_starts_every_value_at_the_data_mean(tiny_model_dir, tiny_rollouts, tmp_path):
    from qalign.data.rollouts import RolloutCollator
    from qalign.trainers.dqo import policy_stats_and_values

    zero = make_trainer(tiny_model_dir, tiny_rollouts, tmp_path / "zero")
    assert zero.model.value_head.summary.bias.item() == 0.0
    trainer = make_trainer(tiny_model_dir, tiny_rollouts, tmp_path / "mean", value_init="mean_return")
    data = trainer.train_dataset
    expected = sum(sum(r) for r in data["rewards"]) / len(data)  # γ = 1, every completion token an action
    assert expected > 0.05, "the dense test reward should give a mean return away from 0"
    assert trainer.model.value_head.summary.bias.item() == pytest.approx(expected, rel=1e-6)
    # The head's weight is still zero, so V_φ(s) equals that mean at every state.
    batch = RolloutCollator(trainer.processing_class.pad_token_id)(data.select(range(2)).to_list())
    _, values = policy_stats_and_values(trainer.model, batch)
    assert torch.allclose(values, torch.full_like(values, expected))
    with pytest.raises(ValueError, match="value_init must be 'zero' or 'mean_return'"):
        DQOConfig(**tiny_kwargs("unused", value_init="mean"))


def test_value_init_mean_return_sets_the_trained_copy_under_lora(tiny_model_dir, tiny_rollouts, tmp_path):
    from peft import LoraConfig

    from qalign.trainers.dqo import ValueHead

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(tiny_model_dir, tiny_rollouts, tmp_path, peft_config=lora, value_init="mean_return")
    trained = [m for n, m in trainer.model.named_modules() if isinstance(m, ValueHead) and "modules_to_save" in n]
    assert len(trained) == 1 and trained[0].summary.bias.item() > 0.05


def test_value_init_mean_return_refuses_a_model_that_already_has_v(tiny_model_dir, tiny_rollouts, tmp_path):
    from qalign.trainers.dqo import attach_value_function

    model = attach_value_function(load_model(str(tiny_model_dir)), "head")
    args = DQOConfig(**tiny_kwargs(tmp_path, value_init="mean_return"))
    with pytest.raises(ValueError, match="already carries one"):
        DQOTrainer(model=model, args=args, train_dataset=load_rollouts(str(tiny_rollouts)),
                   processing_class=load_tokenizer(str(tiny_model_dir)))  # fmt: skip
