"""vLLM server workers on 127.0.0.1, started by the test: generation, balancing, full-weight sync,
GRPO through server URLs (lock-step and one step ahead), and failover when a worker dies (also in the middle
of GRPO training)."""

from __future__ import annotations

import logging

import pytest

from qalign.rollout import SamplingConfig, logprob_gap
from qalign.rollout.config import RolloutArguments
from tests.rollout.conftest import load_hf, load_tokenizer, perturb, prompts_for
from tests.rollout.test_grpo_vllm import make_trainer, sampling_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def servers(vllm_model_dir, tmp_path_factory):
    """Two server workers started from the tiny model's folder (on free ports of 127.0.0.1); synced weights
    go through a chosen folder (on a cluster: a shared filesystem)."""
    from qalign.rollout import VLLMServerEngine

    engine = VLLMServerEngine(str(vllm_model_dir), num_servers=2, max_model_len=256, dtype="float32",
                              start_timeout=600, request_timeout=120, max_retries=2,
                              sync_dir=tmp_path_factory.mktemp("sync") / "shared")  # fmt: skip
    yield engine
    engine.close()


def test_servers_generate_with_ids_and_logprobs(servers, vllm_model_dir):
    tokenizer = load_tokenizer(vllm_model_dir)
    assert all(w.url.startswith("http://127.0.0.1:") for w in servers.workers)
    prompts = prompts_for(tokenizer, ["1 + 2 =", "What is 7 times 3?", "12 - 5", "8 / 2 ="] * 4)
    results = servers.generate(prompts, SamplingConfig(n=2, max_tokens=6))
    assert len(results) == len(prompts)
    for prompt, group in zip(prompts, results):
        assert len(group) == 2
        for completion in group:
            assert completion.prompt_ids == prompt
            assert 1 <= len(completion.completion_ids) <= 6
            assert len(completion.logprobs) == len(completion.completion_ids)
            assert all(lp <= 0 for lp in completion.logprobs)
    assert all(w.served > 0 for w in servers.workers), "both workers should have taken requests"
    seeded = SamplingConfig(n=2, max_tokens=6, seed=7)
    first = [[c.completion_ids for c in g] for g in servers.generate(prompts[:4], seeded)]
    assert first == [[c.completion_ids for c in g] for g in servers.generate(prompts[:4], seeded)]


def test_full_weight_sync_to_servers(servers, vllm_model_dir):
    model, tokenizer = load_hf(vllm_model_dir), load_tokenizer(vllm_model_dir)
    prompts = prompts_for(tokenizer, ["2 + 2 =", "9 - 1 =", "6 * 7 ="])
    assert logprob_gap(servers, model, prompts) < TOLERANCE
    perturb(model)
    assert logprob_gap(servers, model, prompts) > 10 * TOLERANCE
    servers.sync_weights(model)
    assert list(servers._workdir.parent.glob("qalign-vllm-server-*/weights/model.safetensors"))
    assert servers._workdir.parent.name == "shared"
    # logprob_gap sends one request per prompt (it seeds), so both workers are checked.
    for _ in range(2):
        assert logprob_gap(servers, model, prompts) < TOLERANCE


def test_grpo_two_steps_with_vllm_server_backend(servers, vllm_model_dir, tmp_path):
    urls = [w.url for w in servers.workers]
    args = RolloutArguments(rollout_backend="vllm_server", rollout_server_urls=urls)
    trainer = make_trainer(vllm_model_dir, tmp_path, args)
    assert type(trainer.rollout_engine).__name__ == "VLLMServerEngine"
    assert trainer._rollout_synced_step == -1  # external servers: synced before the first generation
    trainer.train()
    assert trainer.state.global_step == 2
    diffs = sampling_metrics(trainer)
    assert len(diffs) == 2 and max(diffs) < TOLERANCE, diffs
    assert all(w.process.alive() for w in servers.workers), "closing a URL engine must not stop the servers"


def test_grpo_one_step_ahead_with_server_workers(servers, vllm_model_dir, tmp_path):
    """``rollout.async_steps: 1`` through the server workers: each batch was sampled by the weights its logged
    lag names, one step behind the trained ones (``check_one_step_ahead``)."""
    from tests.rollout.test_async_rollout import check_one_step_ahead

    urls = [w.url for w in servers.workers]
    args = RolloutArguments(rollout_backend="vllm_server", rollout_server_urls=urls, rollout_async_steps=1)
    trainer = make_trainer(vllm_model_dir, tmp_path, args)
    trainer.args.max_steps = 3
    check_one_step_ahead(trainer, vllm_model_dir)
    assert all(w.process.alive() for w in servers.workers)


def test_worker_killed_during_grpo_training_fails_over(servers, vllm_model_dir, tmp_path, caplog):
    """A server worker SIGKILLed after GRPO's first step: the run finishes on the survivor, which still
    gets every weight sync (its sampling log-probs match the trained model), and the engine that started
    the servers fails over the same way."""
    from transformers import TrainerCallback

    victim, survivor = servers.workers
    served_at_kill: dict[str, int] = {}

    class KillAfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                served_at_kill.update(victim=engine.workers[0].served, survivor=engine.workers[1].served)
                victim.process.kill()
                victim.process.process.wait(30)

    urls = [w.url for w in servers.workers]
    args = RolloutArguments(rollout_backend="vllm_server", rollout_server_urls=urls)
    trainer = make_trainer(vllm_model_dir, tmp_path, args, callbacks=[KillAfterFirstStep()])
    trainer.args.max_steps = 3
    engine = trainer.rollout_engine  # the trainer closes and forgets it when training ends
    with caplog.at_level(logging.WARNING, logger="qalign.rollout.vllm_server"):
        trainer.train()
    assert trainer.state.global_step == 3
    # (closing the engine at the end of training marks every worker closed: count requests instead)
    engine_victim, engine_survivor = engine.workers
    assert engine_survivor.served > served_at_kill["survivor"] and engine_victim.served == served_at_kill["victim"]
    assert any(victim.url in r.getMessage() and "fail" in r.getMessage() for r in caplog.records), caplog.text
    assert not any(survivor.url in r.getMessage() for r in caplog.records), caplog.text
    diffs = sampling_metrics(trainer)
    assert len(diffs) == 3 and max(diffs) < TOLERANCE, diffs  # steps 2-3 sampled from synced weights

    # The engine that owns the processes notices the dead one by its process, not only by a failed request.
    tokenizer = load_tokenizer(vllm_model_dir)
    prompts = prompts_for(tokenizer, ["3 + 3 =", "4 + 4 =", "5 + 5 =", "6 + 6 ="] * 2)
    served = survivor.served
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qalign.rollout.vllm_server"):
        for _ in range(2):
            results = servers.generate(prompts, SamplingConfig(n=2, max_tokens=4))
            assert len(results) == len(prompts) and all(len(g) == 2 for g in results)
    assert not victim.alive and survivor.alive
    assert survivor.served > served
    assert any(victim.url in record.getMessage() and "failed" in record.getMessage() for record in caplog.records)


def test_the_last_worker_killed_stops_training_with_a_resumable_checkpoint(servers, vllm_model_dir, tmp_path):
    """With one worker left and then none: the run stops with an error naming the checkpoint it saved for
    the finished step, and that checkpoint resumes (here on the HF backend, the servers being gone)."""
    from transformers import TrainerCallback

    from qalign.checkpoints import latest_complete_checkpoint
    from qalign.rollout import RolloutUnavailable

    (last,) = servers.live_workers()  # the previous test killed the other one

    class KillAfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                last.process.kill()
                last.process.process.wait(30)

    args = RolloutArguments(rollout_backend="vllm_server", rollout_server_urls=[last.url], rollout_max_retries=1)
    trainer = make_trainer(vllm_model_dir, tmp_path, args, callbacks=[KillAfterFirstStep()])
    trainer.args.max_steps = 3
    with pytest.raises(RolloutUnavailable, match=r"checkpoint-1 holds the 1 finished step\(s\): restart the workers"):
        trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    assert latest_complete_checkpoint(str(tmp_path)) == checkpoint
    saved = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    resumed = make_trainer(vllm_model_dir, tmp_path, RolloutArguments(rollout_backend="hf"))
    resumed.args.max_steps = 3
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    trained = [row["step"] for row in resumed.state.log_history if "loss" in row]  # step 1's row from the checkpoint
    assert trained == [1, 2, 3], "each step trained once: step 1 before the failure, 2 and 3 after the resume"
    assert any(not p.detach().equal(saved[n]) for n, p in resumed.model.named_parameters())
