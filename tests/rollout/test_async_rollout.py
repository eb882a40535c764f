"""Asynchronous rollouts: the background sampler's rules on an engine the test controls, then GRPO with
``rollout.async_steps: 1`` through the real in-process vLLM engine, checked against the trained weights."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import TrainerCallback

from qalign.rollout.async_rollout import AsyncRollouts
from qalign.rollout.base import Completion, RolloutUnavailable, SamplingConfig
from qalign.rollout.config import RolloutArguments
from qalign.rollout.weight_sync import sequence_logprobs
from tests.rollout.conftest import load_hf

SAMPLING = SamplingConfig(max_tokens=4)
WAIT_S = 30  # a gate nobody opens fails the test instead of hanging it


class GatedEngine:
    """An engine whose generations run until the test opens their gate; it logs what happened in which order
    and records any weight push that came while a generation was running."""

    def __init__(self, gated: bool = True):
        self.log: list[tuple] = []
        self.weights = 0  # pushes received
        self.calls = 0
        self.running = False
        self.pushed_while_running = False
        self.gated = gated
        self.gates = [threading.Event() for _ in range(8)]
        self.started = [threading.Event() for _ in range(8)]
        self.fail = False

    def generate(self, prompts, sampling):
        call, self.calls = self.calls, self.calls + 1
        self.running = True
        self.log.append(("start", call, self.weights))
        self.started[call].set()
        try:
            if self.fail:
                raise RolloutUnavailable("every worker is gone")
            if self.gated:
                assert self.gates[call].wait(WAIT_S), f"generation {call} was never released"
            self.log.append(("end", call))
            return [[Completion(list(p), [call], "", [-1.0 - self.weights], "length")] for p in prompts]
        finally:
            self.running = False

    def sync_weights(self, model=None) -> None:
        self.pushed_while_running |= self.running
        self.weights += 1
        self.log.append(("push", self.weights))

    def close(self) -> None:
        pass


def prompts(tag: int) -> list[list[int]]:
    return [[tag, 1], [tag, 2]]


def test_a_push_waits_for_the_running_generation_and_goes_before_the_queued_ones():
    engine = GatedEngine()
    rollouts = AsyncRollouts(engine, max_lag=1)
    rollouts.submit(prompts(1), SAMPLING)
    rollouts.submit(prompts(2), SAMPLING)
    assert engine.started[0].wait(WAIT_S)
    pusher = threading.Thread(target=rollouts.sync, args=(engine.sync_weights, 1))
    pusher.start()
    time.sleep(0.2)
    assert ("push", 1) not in engine.log  # generation 0 still runs: the push must wait
    engine.gates[0].set()
    pusher.join(WAIT_S)
    engine.gates[1].set()
    second = rollouts.take(prompts(2), current=1)
    first = rollouts.take(prompts(1), current=1)  # asked for out of order: dropped with the one before it
    assert first is None
    assert engine.log == [("start", 0, 0), ("end", 0), ("push", 1), ("start", 1, 1), ("end", 1)]
    assert not engine.pushed_while_running
    # Queued at version 0, sampled after the push: it carries the version that sampled it.
    assert second.versions == [1, 1] and second.completion_ids == [[1], [1]] and second.logprobs == [[-2.0]] * 2
    rollouts.close()


def test_take_returns_the_batch_of_those_prompts_with_the_versions_that_sampled_it():
    engine = GatedEngine(gated=False)
    rollouts = AsyncRollouts(engine, max_lag=2, version=5)
    for tag in (1, 2, 3):
        rollouts.submit(prompts(tag), SAMPLING)
    batch = rollouts.take(prompts(1), current=6)
    assert batch.prompt_ids == prompts(1) and batch.versions == [5, 5] and batch.lags(6) == [1, 1]
    assert rollouts.take([[9, 9]], current=6) is None  # nothing queued for these: the caller samples now
    assert rollouts.queued == 2
    now = rollouts.sample_now([[9, 9]], SAMPLING)
    assert now.versions == [5] and rollouts.queued == 2  # sampled ahead of the queue, which stays
    rollouts.close()


def test_a_batch_older_than_max_lag_is_refused():
    engine = GatedEngine(gated=False)
    rollouts = AsyncRollouts(engine, max_lag=1)
    rollouts.submit(prompts(1), SAMPLING)
    rollouts.submit(prompts(2), SAMPLING)
    assert rollouts.take(prompts(1), current=2) is None  # sampled by version 0, two versions behind
    assert rollouts.dropped_stale == 1
    assert rollouts.take(prompts(2), current=1).versions == [0, 0]  # one behind: allowed
    rollouts.close()


def test_a_failed_generation_reaches_the_trainer_and_close_waits_for_a_running_one():
    engine = GatedEngine()
    engine.fail = True
    rollouts = AsyncRollouts(engine, max_lag=1)
    rollouts.submit(prompts(1), SAMPLING)
    with pytest.raises(RolloutUnavailable):
        rollouts.take(prompts(1), current=0)
    engine.fail = False
    rollouts.submit(prompts(2), SAMPLING)
    rollouts.submit(prompts(3), SAMPLING)
    assert engine.started[1].wait(WAIT_S)
    closer = threading.Thread(target=rollouts.close)
    closer.start()
    time.sleep(0.2)
    assert closer.is_alive()  # generation 1 still runs: the engine must not be closed under it
    engine.gates[1].set()
    closer.join(WAIT_S)
    assert not closer.is_alive() and engine.calls == 2  # the queued third never ran


# ----------------------------------------------------------------------------- GRPO through real vLLM


class RecordSteps(TrainerCallback):
    """The trained weights after every step (``weights[t]``: after t updates) and, per step, the scored batch
    TRL trained on (prompts, completions, the sampler's log-probs, TRL's old log-probs and IS ratios)."""

    def __init__(self, trainer):
        self.weights = {0: self._copy(trainer.model)}
        self.batches: list[tuple[int, dict]] = []
        score = trainer._generate_and_score_completions

        def recorded(inputs):
            output = score(inputs)
            keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampling_per_token_logps",
                    "old_per_token_logps", "importance_sampling_ratio")  # fmt: skip
            self.batches.append((trainer.state.global_step, {k: output[k].detach().clone() for k in keys}))
            return output

        trainer._generate_and_score_completions = recorded

    @staticmethod
    def _copy(model) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = self._copy(model)


def row_logprobs(model, batch: dict, row: int) -> torch.Tensor:
    prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
    completion = batch["completion_ids"][row][batch["completion_mask"][row].bool()].tolist()
    return torch.tensor(sequence_logprobs(model, prompt, completion))


def batch_gap(model, weights: dict, batch: dict, key: str) -> float:
    """Largest |``batch[key]`` − log-probs of the batch's completions under ``weights``| (temperature 1)."""
    model.load_state_dict(weights)
    gap = 0.0
    for row in range(batch["completion_ids"].size(0)):
        mask = batch["completion_mask"][row].bool()
        gap = max(gap, (batch[key][row][mask] - row_logprobs(model, batch, row)).abs().max().item())
    return gap


def check_one_step_ahead(trainer, model_dir, reference=None, tolerance: float = 1e-3) -> None:
    """Train ``trainer`` (async_steps 1, sync_every 1, lr large enough to move the weights visibly) and check
    every batch against the weights themselves: the sampler's log-probs TRL divided by are those of the weights
    the batch's logged lag names (and not the current ones when it lags), at most 1 step old; TRL's old log-probs
    are the current weights'; and the IS ratio is exp(Σ old − sampler), masked above its cap. ``reference``: a
    model that loads the trainer's state dicts (default: the HF model in ``model_dir``)."""
    record = RecordSteps(trainer)
    trainer.add_callback(record)
    trainer.train()
    lags = [row["rollout/staleness/max"] for row in trainer.state.log_history if "rollout/staleness/max" in row]
    assert len(lags) == len(record.batches) == trainer.state.global_step
    assert all(lag in (0.0, 1.0) for lag in lags), lags
    assert lags[0] == 0.0 and sum(lags) >= 1, lags  # the first batch has no older weights; later ones ran ahead
    model = load_hf(model_dir) if reference is None else reference
    for (step, batch), lag in zip(record.batches, lags):
        sampled_by = step - int(lag)
        assert batch_gap(model, record.weights[sampled_by], batch, "sampling_per_token_logps") < tolerance, step
        if lag:
            assert batch_gap(model, record.weights[step], batch, "sampling_per_token_logps") > 10 * tolerance, step
        assert batch_gap(model, record.weights[step], batch, "old_per_token_logps") < tolerance, step
        mask = batch["completion_mask"].float()
        log_ratio = ((batch["old_per_token_logps"] - batch["sampling_per_token_logps"]) * mask).sum(1, keepdim=True)
        expected = torch.exp(log_ratio).masked_fill(torch.exp(log_ratio) > 3.0, 0.0)  # TRL's sequence_mask, cap 3
        torch.testing.assert_close(batch["importance_sampling_ratio"], expected)


@pytest.mark.vllm
@pytest.mark.slow
def test_grpo_one_step_ahead_with_in_process_vllm(vllm_model_dir, tmp_path):
    from tests.rollout.test_grpo_vllm import make_trainer

    args = RolloutArguments(rollout_backend="vllm", rollout_max_model_len=128, rollout_async_steps=1)
    trainer = make_trainer(vllm_model_dir, tmp_path, args)
    trainer.args.max_steps = 3
    check_one_step_ahead(trainer, vllm_model_dir)
    assert trainer.rollout_engine is None and trainer._async_rollouts is None  # thread stopped, engine closed


@pytest.mark.vllm
@pytest.mark.slow
def test_grpo_one_step_ahead_with_a_lora_adapter(vllm_model_dir, tmp_path):
    """The same with a PEFT LoRA model: each push is a new adapter, loaded while no generation runs."""
    from peft import LoraConfig, get_peft_model

    from tests.rollout.test_grpo_vllm import make_trainer

    lora = dict(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    args = RolloutArguments(rollout_backend="vllm", rollout_max_model_len=128, rollout_async_steps=1,
                            rollout_max_lora_rank=8)  # fmt: skip
    trainer = make_trainer(vllm_model_dir, tmp_path, args, peft_config=LoraConfig(**lora))
    trainer.args.max_steps = 3
    check_one_step_ahead(trainer, vllm_model_dir, reference=get_peft_model(load_hf(vllm_model_dir), LoraConfig(**lora)))
