"""GRPO (and so QAE) sampling through qalign's in-process vLLM engine: 2 real training steps."""

from __future__ import annotations

import pytest

from qalign.rollout.config import RolloutArguments
from tests.rollout.conftest import load_hf, load_tokenizer
from tests.trainers.helpers import digit_fraction_reward, tiny_grpo_kwargs, tiny_prompt_dataset

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def make_trainer(model_dir, output_dir, rollout_args, **kwargs):
    from qalign.trainers.grpo import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(model_dir)
    return GRPOTrainer(
        model=load_hf(model_dir),
        reward_funcs=[digit_fraction_reward],
        args=GRPOConfig(**tiny_grpo_kwargs(output_dir)),
        train_dataset=tiny_prompt_dataset(16),
        processing_class=tokenizer,
        rollout_args=rollout_args,
        **kwargs,
    )


def sampling_metrics(trainer) -> list[float]:
    return [row["sampling/sampling_logp_difference/max"] for row in trainer.state.log_history
            if "sampling/sampling_logp_difference/max" in row]  # fmt: skip


def test_grpo_two_steps_with_vllm_backend(vllm_model_dir, tmp_path):
    trainer = make_trainer(
        vllm_model_dir, tmp_path, RolloutArguments(rollout_backend="vllm", rollout_max_model_len=128)
    )
    assert trainer.rollout_engine is not None and type(trainer.rollout_engine).__name__ == "VLLMEngine"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not p.detach().equal(before[n]) for n, p in trainer.model.named_parameters())
    # The sampler's log-probs reached TRL's importance-sampling correction, and (lr=1e-2 moves the
    # weights visibly) agree with the trained model at step 2 only because the weights were synced.
    diffs = sampling_metrics(trainer)
    assert len(diffs) == 2 and max(diffs) < 1e-3, diffs
    assert trainer.rollout_engine is None  # the trainer closed the engine it built
