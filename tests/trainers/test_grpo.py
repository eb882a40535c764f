"""GRPO and QAE on a tiny model: same numbers as TRL, parameters move, rewards logged, LoRA, resume."""

from __future__ import annotations

import pytest
import torch
import trl
from transformers import TrainerCallback

from qalign.losses import quantile_advantages
from qalign.models import load_model, load_tokenizer
from qalign.trainers.grpo import GRPOConfig, GRPOTrainer
from qalign.trainers.qae import QAEConfig, QAETrainer
from tests.trainers.helpers import digit_fraction_reward, tiny_grpo_kwargs, tiny_prompt_dataset


def make_trainer(trainer_cls, config, model_dir, **kwargs):
    return trainer_cls(
        model=load_model(str(model_dir)),
        reward_funcs=[digit_fraction_reward],
        args=config,
        train_dataset=tiny_prompt_dataset(),
        processing_class=load_tokenizer(str(model_dir)),
        **kwargs,
    )


def test_grpo_equals_plain_trl_on_the_same_seed(tiny_model_dir, tmp_path):
    # Built and trained one after the other: each trainer seeds the global RNG when it is built.
    ours = make_trainer(GRPOTrainer, GRPOConfig(**tiny_grpo_kwargs(tmp_path / "ours")), tiny_model_dir)
    ours.train()
    theirs = make_trainer(trl.GRPOTrainer, trl.GRPOConfig(**tiny_grpo_kwargs(tmp_path / "trl")), tiny_model_dir)
    theirs.train()
    losses = lambda t: [log["loss"] for log in t.state.log_history if "loss" in log]
    assert losses(ours) == losses(theirs)
    for (name, mine), (_, reference) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        assert torch.equal(mine, reference), name


def test_grpo_changes_parameters_and_logs_reward(tiny_model_dir, tmp_path):
    trainer = make_trainer(GRPOTrainer, GRPOConfig(**tiny_grpo_kwargs(tmp_path)), tiny_model_dir)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards)


class CaptureAdvantages(TrainerCallback):
    """Records, per generation, the gathered rewards and the advantages the loss received."""

    def __init__(self, trainer):
        self.records = []
        original = trainer._generate_and_score_completions

        def wrapped(inputs):
            output = original(inputs)
            rewards = trainer._gathered_rewards_per_func.sum(dim=1).clone()
            self.records.append((rewards, output["advantages"].clone()))
            return output

        trainer._generate_and_score_completions = wrapped


@pytest.mark.parametrize("interpolation", ["paper", "torch_linear"])
def test_qae_uses_the_quantile_baseline(tiny_model_dir, tmp_path, interpolation):
    config = QAEConfig(**tiny_grpo_kwargs(tmp_path), quantile_k=0.4, quantile_interpolation=interpolation)
    trainer = make_trainer(QAETrainer, config, tiny_model_dir)
    capture = CaptureAdvantages(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert len(capture.records) == 2
    for rewards, advantages in capture.records:
        # Independent check of the baseline: per group of 4, the K=0.4 quantile of the sorted rewards.
        for group, group_advantages in zip(rewards.view(-1, 4), advantages.view(-1, 4)):
            ordered = sorted(group.tolist())
            if interpolation == "paper":
                baseline = ordered[1]  # ceil(0.4·4) − 1 = 1
            else:
                baseline = ordered[1] + 0.2 * (ordered[2] - ordered[1])  # position 0.4·3 = 1.2
            std = group.std().item()
            expected = [(r - baseline) / (std + 1e-4) for r in group.tolist()]
            assert group_advantages.tolist() == pytest.approx(expected, abs=1e-5)
        assert torch.equal(advantages, quantile_advantages(rewards, 4, 0.4, interpolation=interpolation))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert [log for log in trainer.state.log_history if "reward" in log]
    assert "qae/zero_advantage_frac" in trainer.state.log_history[0]


def test_lora_trains_only_adapter_weights(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    config = GRPOConfig(**tiny_grpo_kwargs(tmp_path))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(GRPOTrainer, config, tiny_model_dir, peft_config=lora)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "no parameter moved"
    assert all("lora_" in n for n in changed), sorted(changed - {n for n in changed if "lora_" in n})
    # Only lora_B starts at zero; lora_A and lora_B must both train.
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


class CrashAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill right after the checkpoint")


def test_resume_after_kill_reaches_the_same_loss(tiny_model_dir, tmp_path):
    """Tolerance: exact on CPU (RNG, optimizer and scheduler states are all restored); 1e-6 stated."""
    kwargs = tiny_grpo_kwargs(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    uninterrupted = make_trainer(
        GRPOTrainer, GRPOConfig(**{**kwargs, "output_dir": str(tmp_path / "full")}), tiny_model_dir
    )
    uninterrupted.train()
    reference = {log["step"]: log["loss"] for log in uninterrupted.state.log_history if "loss" in log}

    crashing = make_trainer(GRPOTrainer, GRPOConfig(**kwargs), tiny_model_dir, callbacks=[CrashAfterStep(2)])
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()

    resumed = make_trainer(GRPOTrainer, GRPOConfig(**kwargs), tiny_model_dir)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    after = {log["step"]: log["loss"] for log in resumed.state.log_history if "loss" in log}
    assert after[3] == pytest.approx(reference[3], abs=1e-6)
    assert after[4] == pytest.approx(reference[4], abs=1e-6)
    for (name, mine), (_, ref) in zip(resumed.model.named_parameters(), uninterrupted.model.named_parameters()):
        assert torch.allclose(mine, ref, atol=1e-6), name


@pytest.mark.parametrize("trainer_cls, config_cls", [(GRPOTrainer, GRPOConfig), (QAETrainer, QAEConfig)])
def test_sft_anchor_adds_exactly_its_term_to_the_policy_loss(tiny_model_dir, tmp_path, trainer_cls, config_cls):
    """sft_coef = λ adds λ × the untempered NLL of the micro-batch's successful completions (over the
    accumulation window, as TRL scales its own loss) to TRL's loss, and nothing else."""
    from qalign.data.rollouts import completion_token_stats
    from qalign.losses.anchor import success_nll

    # The dense test reward is > 0 for most samples: a threshold of 0.05 makes only some of them "successes";
    # two accumulation steps check the scaling, T = 0.7 that the anchor is not the sampler's tempered NLL.
    args = config_cls(**tiny_grpo_kwargs(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                         temperature=0.7, sft_coef=2.0, sft_reward_threshold=0.05))  # fmt: skip
    trainer = make_trainer(trainer_cls, args, tiny_model_dir)
    compute_loss, checked = trainer._compute_loss, []

    def checking_loss(model, inputs):
        loss = compute_loss(model, inputs)
        with torch.no_grad():
            plain = trl.GRPOTrainer._compute_loss(trainer, model, inputs)
            stats = completion_token_stats(model, inputs)
            rewards = inputs["sft_rewards"].unsqueeze(1)
            nll = success_nll(stats.logprobs, rewards, inputs["completion_mask"].bool(), 0.05)
        checked.append((loss.item(), plain.item(), nll.item()))
        return loss

    trainer._compute_loss = checking_loss
    trainer.train()
    assert len(checked) == 4 and any(nll > 0 for *_, nll in checked), "some sample should pass the threshold"
    for loss, plain, nll in checked:
        assert loss == pytest.approx(plain + 2.0 * nll / 2, rel=1e-5, abs=1e-6)
    assert any("grpo/sft_nll" in log for log in trainer.state.log_history)
    with pytest.raises(ValueError, match="sft_coef must be >= 0"):
        config_cls(**tiny_grpo_kwargs(tmp_path, sft_coef=-1.0))
