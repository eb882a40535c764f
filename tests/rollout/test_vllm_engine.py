"""In-process vLLM engine on real vLLM: sampling, log-probs, stop strings, full-weight sync."""

from __future__ import annotations

import pytest

from qalign.rollout import SamplingConfig, logprob_gap
from tests.rollout.conftest import load_hf, load_tokenizer, perturb, prompts_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOLERANCE = 1e-3  # float32 vLLM vs HF forward; measured gaps are ~1e-6


@pytest.fixture(scope="module")
def setup(vllm_model_dir):
    from qalign.rollout import VLLMEngine

    model, tokenizer = load_hf(vllm_model_dir), load_tokenizer(vllm_model_dir)
    engine = VLLMEngine(model, tokenizer, max_model_len=256, seed=0)
    yield engine, model, tokenizer
    engine.close()


def test_generate_shapes_and_logprobs(setup):
    engine, _, tokenizer = setup
    prompts = prompts_for(tokenizer, ["1 + 2 =", "What is 7 times 3?", "12 - 5"])
    results = engine.generate(prompts, SamplingConfig(n=3, max_tokens=6, seed=0))
    assert len(results) == 3
    for prompt, group in zip(prompts, results):
        assert len(group) == 3
        for completion in group:
            assert completion.prompt_ids == prompt
            assert 1 <= len(completion.completion_ids) <= 6
            assert len(completion.logprobs) == len(completion.completion_ids)
            assert all(lp <= 0 for lp in completion.logprobs)
            assert completion.finish_reason in ("stop", "length")


def test_seed_reproducible_and_repeated_prompts_differ(setup):
    engine, _, tokenizer = setup
    prompts = prompts_for(tokenizer, ["3 + 4 =", "3 + 4 ="])
    sampling = SamplingConfig(n=2, max_tokens=8, seed=123)
    first = [[c.completion_ids for c in g] for g in engine.generate(prompts, sampling)]
    second = [[c.completion_ids for c in g] for g in engine.generate(prompts, sampling)]
    assert first == second
    samples = [ids for group in first for ids in group]
    assert len({tuple(s) for s in samples}) > 1, "a seed must not make GRPO's repeated prompts identical"


def test_stop_string(setup):
    engine, _, tokenizer = setup
    prompt = prompts_for(tokenizer, ["5 + 5 ="])
    greedy = SamplingConfig(temperature=0.0, max_tokens=24)
    text = engine.generate(prompt, greedy)[0][0].text
    stop = next(text[k : k + 2] for k in range(1, len(text) - 1) if text[k : k + 2].strip())
    stopped = engine.generate(prompt, SamplingConfig(temperature=0.0, max_tokens=24, stop=[stop]))[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]


def test_logprobs_match_hf_before_and_after_full_sync(setup):
    engine, model, tokenizer = setup
    prompts = prompts_for(tokenizer, ["2 + 2 =", "9 - 1 =", "6 * 7 ="])
    assert logprob_gap(engine, model, prompts) < TOLERANCE
    perturb(model)
    stale = logprob_gap(engine, model, prompts)
    assert stale > 10 * TOLERANCE, "perturbation too small to tell a sync from no sync"
    engine.sync_weights(model)
    assert logprob_gap(engine, model, prompts) < TOLERANCE


def test_seeded_batch_larger_than_one_prefill_step(setup):
    """Prompts totalling more than vLLM's per-step token budget (4096): on CPU a seeded prompt split by
    chunked prefill used to abort the engine ("CPU Generator does not use offset")."""
    engine, _, tokenizer = setup
    prompts = prompts_for(tokenizer, [f"{i} + 1 = " * 25 for i in range(48)])
    assert sum(map(len, prompts)) > 4096 and max(map(len, prompts)) < 250
    sampling = SamplingConfig(n=2, max_tokens=3, seed=7)
    first = engine.generate(prompts, sampling)
    assert [len(group) for group in first] == [2] * 48
    again = engine.generate(prompts, sampling)
    assert [[c.completion_ids for c in g] for g in first] == [[c.completion_ids for c in g] for g in again]
