"""``rollout.async_steps`` in the GRPO family, on the tiny model with an engine whose log-probs are known:
K = 0 is the lock-step run bit for bit; K = 1 trains on batches sampled one step ahead, by the weights their
version names, with TRL's importance ratio built on the sampler's own log-probs; a stale batch is never
trained on; and the option is refused, in one line, where it could not take effect."""

from __future__ import annotations

import threading

import pytest
import torch
import yaml

from qalign.config import ConfigError
from qalign.models import load_model, load_tokenizer
from qalign.rollout.base import Completion
from qalign.rollout.config import ONLINE_ALGORITHMS, RolloutArguments, SamplingRolloutArguments
from qalign.trainers.grpo import GRPOConfig, GRPOTrainer
from qalign.trainers.qae import QAEConfig, QAETrainer
from tests.trainers.helpers import digit_fraction_reward, tiny_grpo_kwargs, tiny_prompt_dataset


class KnownEngine:
    """Deterministic completions whose log-probs say which weights sampled them: every token of a completion
    sampled after ``p`` weight pushes has log-prob ``logprob_at(p)``. Logs each call's thread and push count."""

    in_sync = True  # starts from the trainer's weights, as an engine built from the model does

    def __init__(self):
        self.pushes = 0
        self.generated = 0
        self.calls: list[dict] = []  # generations and pushes, in order

    @staticmethod
    def logprob_at(pushes: int) -> float:
        return -0.5 - 0.25 * pushes

    def generate(self, prompts, sampling):
        call, self.generated = self.generated, self.generated + 1
        self.calls.append({"thread": threading.current_thread().name, "pushes": self.pushes})
        generator = torch.Generator().manual_seed(call)
        out = []
        for prompt in prompts:
            # First token: the call's index, so a trained batch names the generation that made it.
            ids = [100 + call, *torch.randint(3, 90, (5,), generator=generator).tolist()]
            out.append([Completion(list(prompt), ids, "", [self.logprob_at(self.pushes)] * len(ids), "length")])
        return out

    def sync_weights(self, model) -> None:
        self.calls.append({"push": self.pushes + 1, "thread": threading.current_thread().name})
        self.pushes += 1

    def close(self) -> None:
        pass


def make_trainer(model_dir, output_dir, rollout_args: RolloutArguments | None, trainer_cls=GRPOTrainer,
                 config_cls=GRPOConfig, engine=None, **config):  # fmt: skip
    engine_kwargs = {} if rollout_args is None else dict(rollout_args=rollout_args, rollout_engine=engine)
    return trainer_cls(
        model=load_model(str(model_dir)),
        reward_funcs=[digit_fraction_reward],
        args=config_cls(**tiny_grpo_kwargs(output_dir, **{"max_steps": 4, **config})),
        train_dataset=tiny_prompt_dataset(),
        processing_class=load_tokenizer(str(model_dir)),
        **engine_kwargs,
    )


def capture_scored_batches(trainer) -> list[tuple[int, dict]]:
    """(global step, the scored batch TRL trains on) for every generation."""
    batches = []
    score = trainer._generate_and_score_completions

    def recorded(inputs):
        output = score(inputs)
        batches.append((trainer.state.global_step, {k: v.detach().clone() for k, v in output.items()
                                                    if isinstance(v, torch.Tensor) and v.ndim == 2}))  # fmt: skip
        return output

    trainer._generate_and_score_completions = recorded
    return batches


def staleness(trainer) -> list[float]:
    return [row["rollout/staleness/max"] for row in trainer.state.log_history if "rollout/staleness/max" in row]


def test_zero_async_steps_is_the_lock_step_run_bit_for_bit(tiny_model_dir, tmp_path):
    runs = {}
    for name, rollout in [("no key", RolloutArguments(rollout_backend="vllm")),
                          ("async_steps 0", RolloutArguments(rollout_backend="vllm", rollout_async_steps=0))]:  # fmt: skip
        engine = KnownEngine()
        trainer = make_trainer(tiny_model_dir, tmp_path / str(len(runs)), rollout, engine=engine)
        trainer.train()
        assert trainer._async_rollouts is None and not staleness(trainer)
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        runs[name] = (losses, [p.detach().clone() for p in trainer.model.parameters()], engine.calls)
    (losses, params, calls), (losses_0, params_0, calls_0) = runs.values()
    assert losses == losses_0 and len(losses) == 4
    assert all(torch.equal(a, b) for a, b in zip(params, params_0))
    # Lock-step: generate, push, generate, … all on the trainer's thread, nothing sampled ahead.
    assert calls == calls_0
    assert [("push" in c) for c in calls] == [False, True, False, True, False, True, False]
    assert {c["thread"] for c in calls} == {threading.main_thread().name}


@pytest.mark.parametrize("trainer_cls,config_cls", [(GRPOTrainer, GRPOConfig), (QAETrainer, QAEConfig)])
def test_one_async_step_trains_on_the_samplers_own_logprobs(tiny_model_dir, tmp_path, trainer_cls, config_cls):
    engine = KnownEngine()
    rollout = RolloutArguments(rollout_backend="vllm", rollout_async_steps=1)
    # Per-token ratios, uncapped: each one is exp(old − sampler) of its token.
    trainer = make_trainer(tiny_model_dir, tmp_path, rollout, trainer_cls, config_cls, engine=engine,
                           vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1e9)  # fmt: skip
    batches = capture_scored_batches(trainer)
    trainer.train()
    lags = staleness(trainer)
    assert len(batches) == len(lags) == 4
    generations = [c for c in engine.calls if "push" not in c]
    for (step, batch), lag in zip(batches, lags):
        mask = batch["completion_mask"].bool()
        # The generation this batch came from (its first token), and how many pushes its weights had had.
        call = generations[int(batch["completion_ids"][0, 0]) - 100]
        assert step - call["pushes"] == lag <= 1  # one push per step: the logged lag is the weights' age
        sampler = batch["sampling_per_token_logps"][mask]
        assert torch.equal(sampler, torch.full_like(sampler, KnownEngine.logprob_at(call["pushes"])))
        ratio = torch.exp(batch["old_per_token_logps"] - batch["sampling_per_token_logps"])
        torch.testing.assert_close(batch["importance_sampling_ratio"][mask], ratio[mask])
    assert lags[0] == 0 and sum(lags) >= 1, lags
    # Batches after the first were sampled on the background thread, the pushes on the trainer's.
    assert {c["thread"] for c in generations[1:]} == {"qalign-rollout_0"}
    assert {c["thread"] for c in engine.calls if "push" in c} == {threading.main_thread().name}
    assert trainer._async_rollouts is None  # stopped when training ended


def test_a_stale_batch_is_sampled_again_and_never_trained_on(tiny_model_dir, tmp_path, caplog):
    engine = KnownEngine()
    rollout = RolloutArguments(rollout_backend="vllm", rollout_async_steps=1)
    trainer = make_trainer(tiny_model_dir, tmp_path, rollout, engine=engine, max_steps=3)
    batches = capture_scored_batches(trainer)
    # The batch queued for step 2 claims weights 5 versions old: it must not be trained on.
    pipeline = trainer._rollout_pipeline()
    sample = pipeline._sample

    def stale_third(prompt_ids, sampling):
        batch = sample(prompt_ids, sampling)
        if engine.generated == 3:  # generation 2, queued during step 1
            batch.versions = [v - 5 for v in batch.versions]
        return batch

    pipeline._sample = stale_third
    with caplog.at_level("WARNING", logger="qalign.rollout.async_rollout"):
        trainer.train()
    assert pipeline.dropped_stale == 1 and "dropped, to be sampled again" in caplog.text
    generations = [c for c in engine.calls if "push" not in c]
    trained = [int(batch["completion_ids"][0, 0]) - 100 for _, batch in batches]
    assert len(generations) == 4 and trained == [0, 1, 3]  # generation 2 (the stale one) was never trained on
    assert generations[3]["thread"] == threading.main_thread().name and generations[3]["pushes"] == 2
    assert staleness(trainer) == [0.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- refused where it cannot work


def test_async_steps_is_refused_where_it_could_not_take_effect(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"^rollout.async_steps 1 needs rollout.backend vllm or vllm_server"):
        RolloutArguments(rollout_async_steps=1)  # hf samples with the model being trained
    with pytest.raises(ValueError, match=r"^rollout.async_steps must be an integer >= 0"):
        RolloutArguments(rollout_backend="vllm", rollout_async_steps=-1)
    with pytest.raises(ValueError, match=r"^rollout.async_steps applies to online training"):
        SamplingRolloutArguments(rollout_async_steps=1)  # eval, collect, Q#: a fixed policy
    from qalign.train_config import parse_config, validate_values

    with pytest.raises(ConfigError, match=r"^rollout.async_steps applies to online training .*dqo"):
        validate_values("dqo", {"rollout_async_steps": 1})
    validate_values("shiq_online", {"rollout_async_steps": 2})
    # auto resolved to hf: refused once resolved.
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"algorithm": "grpo", "model_name_or_path": str(tiny_model_dir),
                                      "output_dir": str(tmp_path / "out"),
                                      "rollout": {"backend": "auto", "async_steps": 1}}))  # fmt: skip
    monkeypatch.setattr("qalign.rollout.backend.resolve_backend", lambda backend, recorded=None: "hf")
    with pytest.raises(ConfigError, match=r"^rollout.async_steps 1 needs rollout.backend vllm or vllm_server"):
        parse_config(["--config", str(config)])
    # A custom rollout_func samples by itself: nothing could be queued for it.
    with pytest.raises(ValueError, match=r"^rollout.async_steps 1 queues TRL's own generation"):
        GRPOTrainer(model=load_model(str(tiny_model_dir)), reward_funcs=[digit_fraction_reward],
                    args=GRPOConfig(**tiny_grpo_kwargs(tmp_path)), train_dataset=tiny_prompt_dataset(),
                    processing_class=load_tokenizer(str(tiny_model_dir)), rollout_func=lambda prompts, trainer: {},
                    rollout_args=RolloutArguments(rollout_backend="vllm", rollout_async_steps=1),
                    rollout_engine=KnownEngine())  # fmt: skip


def test_the_online_algorithms_are_the_trainers_that_sample_while_they_train():
    from qalign.trainers.registry import TRAINERS, trainer_class

    online = {name for name in TRAINERS if issubclass(trainer_class(name), GRPOTrainer)}
    assert online == set(ONLINE_ALGORITHMS)
