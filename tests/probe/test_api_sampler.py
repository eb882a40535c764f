"""Candidates from a REAL OpenAI-compatible server (vLLM serving the tiny Llama on 127.0.0.1 with an API
key, behind the misbehaving proxy): completions and chat endpoints, best-of-k over the API, and the
CLI with an API sampler."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qalign.probe.sampling import OpenAISampler
from qalign.rollout.base import SamplingConfig
from tests.needs import require
from tests.probe.proxy import MisbehavingProxy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KEY_ENV = "QALIGN_TEST_SAMPLER_KEY"
KEY = "sk-qalign-SAMPLER-41b7e2d0-never-print-me"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    require("vllm")
    from qalign.server_process import ServerProcess, free_port, wait_until_healthy

    folder = tmp_path_factory.mktemp("sampler-server")
    template = folder / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    env = dict(os.environ, VLLM_API_KEY=KEY, VLLM_CPU_KVCACHE_SPACE="1")
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--served-model-name", "tiny",
            "--chat-template", str(template), "--seed", "0"]  # fmt: skip
    process = ServerProcess.vllm(str(tiny_model_dir), "127.0.0.1", free_port(), folder / "server.log", args, env)
    try:
        wait_until_healthy(process.url, 600, process)
        yield process.url
    finally:
        process.stop()
    assert KEY not in (folder / "server.log").read_text(errors="replace")


@pytest.fixture()
def proxy(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    started = MisbehavingProxy(server)
    yield started
    started.close()


def sampler_for(proxy, endpoint="completions", **kwargs) -> OpenAISampler:
    return OpenAISampler(f"{proxy.url}/v1", "tiny", endpoint, KEY_ENV, max_concurrency=2, backoff_base=0.01, **kwargs)


def test_completions_endpoint_with_retries_and_seeds(proxy):
    proxy.reset(["429", "drop"])
    prompts = ["What is 3 + 4?", "What is 6 times 2?", "Ana has 5 apples."]
    sampling = SamplingConfig(n=4, max_tokens=6, seed=3, temperature=1.0)
    groups = sampler_for(proxy).sample(prompts, sampling)
    assert [len(g) for g in groups] == [4, 4, 4]
    assert proxy.counts == {"429": 1, "drop": 1, "forward": 3}
    for prompt, group in zip(prompts, groups):
        assert all(c.prompt == prompt and c.completion.finish_reason in ("stop", "length") for c in group)
        assert len({c.text for c in group}) > 1, "n samples of one prompt should differ"
    again = sampler_for(proxy).sample(prompts, sampling)
    assert [[c.text for c in g] for g in again] == [[c.text for c in g] for g in groups]  # seed + i per prompt


def test_chat_endpoint(proxy):
    groups = sampler_for(proxy, "chat").sample(["What is 2 + 2?"], SamplingConfig(n=3, max_tokens=5, seed=0))
    assert len(groups[0]) == 3 and groups[0][0].prompt == "What is 2 + 2?"
    assert sampler_for(proxy, "chat").describe() == {
        "kind": "openai_chat",
        "base_url": f"{proxy.url}/v1",
        "model": "tiny",
    }


def test_best_of_k_over_the_api_with_local_embeddings(proxy, tiny_model_dir):
    """The paper's Table 2 setting: API samples, embeddings from a local model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qalign.probe.embed_local import HiddenStateEmbedder
    from qalign.probe.models import Probe
    from qalign.probe.policy import BestOfKPolicy

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    embedder = HiddenStateEmbedder(model, tokenizer)
    torch.manual_seed(0)
    probe = Probe(model.config.hidden_size)
    policy = BestOfKPolicy(sampler_for(proxy), embedder, probe, k=5)
    chosen = policy.sample(["What is 3 + 4?", "What is 8 - 5?"], SamplingConfig(n=2, max_tokens=6, seed=0))
    assert [len(row) for row in chosen] == [2, 2]
    for row, selections in zip(chosen, policy.last_selections):
        for completion, selection in zip(row, selections):
            assert selection.chosen == int(selection.q.argmax())
            assert completion.text == selection.candidates[selection.chosen].text
    assert proxy.counts["forward"] == 2  # one request per prompt for its n·k = 10 candidates


def test_cli_with_an_api_sampler(proxy, tiny_model_dir, tmp_path):
    from qalign.probe.__main__ import main

    out = tmp_path / "api-run"
    argv = [
        "--model_name_or_path", str(tiny_model_dir), "--sampler.backend", "openai_completions",
        "--sampler.base_url", f"{proxy.url}/v1", "--sampler.model", "tiny", "--sampler.api_key_env", KEY_ENV,
        "--num_train_prompts", "4", "--num_test_prompts", "2", "--samples_per_prompt", "4", "--max_tokens", "6",
        "--losses", "mse", "pg", "--probe.epochs", "3", "--output_dir", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["train"]["samples"] == 16 and results["config"]["sampler_api_key_env"] == KEY_ENV
    for file in out.iterdir():
        if file.is_file() and file.suffix in (".json", ".jsonl", ".md"):
            assert KEY not in file.read_text()
