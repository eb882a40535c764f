"""Every kind of saved policy, loaded by ``load_policy`` and served: a LoRA adapter, a Q# guided policy
and a Q-probe best-of-k policy, each made for real on the tiny model. Completions, chat, streaming, n and
seeds behave as for a plain model, and each answer is the policy's own sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qalign.data.prompts import render_prompt
from qalign.rollout.base import SamplingConfig
from qalign.serve.app import build_app
from qalign.serve.prompts import context_length
from tests.serve.conftest import client, hf_policy, running_server

PROMPT = "What is 3 + 4?"
MESSAGES = [{"role": "user", "content": "What is 9 - 4?"}]


def make_lora(model_dir: Path, folder: Path) -> Path:
    """An adapter with random (not zero) B: a "trained" one, which changes what the model samples."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B is zero at init: an adapter that would change nothing
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


def make_qsharp(model_dir: Path, folder: Path) -> Path:
    """A Q# output folder: a value model with a strong random head, and guided_policy.json."""
    from qalign.decoding.guided import GuidanceConfig, save_guided_policy
    from qalign.value_model import QSharpValueModel, ValueHeadConfig

    torch.manual_seed(2)
    value_model = QSharpValueModel.from_reference(str(model_dir), ValueHeadConfig(head="bernoulli", num_layers=1))
    with torch.no_grad():
        value_model.score.weight.normal_(0.0, 2.0)
    value_model.save_pretrained(folder / "value_model")
    save_guided_policy(folder, str(model_dir), "value_model", GuidanceConfig(eta=0.3, top_k=6))
    return folder


def make_best_of_k(model_dir: Path, folder: Path) -> Path:
    """A Q-probe output folder as ``qalign probe`` writes it: probe weights and best_of_k_policy.json."""
    from qalign.probe.config import ProbeArguments
    from qalign.probe.models import Probe
    from qalign.probe.saved_policy import save_best_of_k_policy

    args = ProbeArguments(
        model_name_or_path=str(model_dir), sampler_backend="hf", embedder_kind="hidden_state",
        samples_per_prompt=3, temperature=1.0, max_tokens=6, output_dir=str(folder),
    )  # fmt: skip
    torch.manual_seed(3)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    Probe(hidden).save(folder / "probe_pg.pt", extra={"loss": "pg"})
    save_best_of_k_policy(args, "pg")
    return folder


MAKERS = {"lora": make_lora, "qsharp": make_qsharp, "qprobe_best_of_k": make_best_of_k}


@pytest.fixture(scope="module", params=list(MAKERS))
def served(request, chat_model_dir, tmp_path_factory):
    """(kind, policy, openai client) for one saved policy behind a running server."""
    from qalign.policies import load_policy, policy_kind

    kind = request.param
    folder = MAKERS[kind](chat_model_dir, tmp_path_factory.mktemp(kind))
    assert policy_kind(str(folder)) == kind
    policy = load_policy(str(folder))
    assert policy.describe()["kind"] == kind
    with running_server(build_app(policy, kind)) as url:
        yield kind, policy, client(url)
    policy.close()


@pytest.fixture(scope="module")
def base_policy(chat_model_dir):
    policy = hf_policy(chat_model_dir)
    yield policy
    policy.close()


def sample(policy, prompts, **sampling):
    return policy.sample(prompts, SamplingConfig(**sampling))


def test_completion_is_the_policys_sample(served, base_policy):
    kind, policy, api = served
    assert context_length(policy) == 512  # found through the engine (or the best-of-k sampler's engine)
    response = api.completions.create(model=kind, prompt=PROMPT, max_tokens=6, seed=8)
    [expected] = sample(policy, [PROMPT], n=1, max_tokens=6, seed=8)[0]
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_ids)
    assert response.usage.completion_tokens == len(expected.completion_ids)
    if kind == "qprobe_best_of_k":  # the answer is the probe's pick among k = 3 candidates
        [[selection]] = policy.last_selections
        assert len(selection.candidates) == 3 and selection.chosen == int(selection.q.argmax())
        assert selection.candidates[selection.chosen].completion.text == response.choices[0].text
    else:  # the adapter / the guidance changes what is sampled from the same seed
        assert response.choices[0].text != sample(base_policy, [PROMPT], n=1, max_tokens=6, seed=8)[0][0].text


def test_chat_is_rendered_as_qalign_renders_prompts(served):
    kind, policy, api = served
    response = api.chat.completions.create(model=kind, messages=MESSAGES, max_tokens=6, seed=4)
    rendered = render_prompt(policy.tokenizer, "", messages=MESSAGES)
    assert rendered == "<|user|>What is 9 - 4?\n<|assistant|>"
    [expected] = sample(policy, [rendered], n=1, max_tokens=6, seed=4)[0]
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(expected.prompt_ids)


def test_stream_n_and_seed(served):
    kind, policy, api = served
    whole = api.completions.create(model=kind, prompt=PROMPT, max_tokens=6, seed=6, n=2)
    expected = sample(policy, [PROMPT], n=2, max_tokens=6, seed=6)[0]
    assert [c.text for c in whole.choices] == [e.text for e in expected]
    assert whole.usage.completion_tokens == sum(len(e.completion_ids) for e in expected)
    streamed = list(api.completions.create(model=kind, prompt=PROMPT, max_tokens=6, seed=6, n=2, stream=True))
    for index in (0, 1):
        pieces = [c.choices[0].text for c in streamed if c.choices[0].index == index]
        assert "".join(pieces) == whole.choices[index].text
    chat = [
        api.chat.completions.create(model=kind, messages=MESSAGES, max_tokens=6, seed=s).choices[0].message.content
        for s in (5, 5)
    ]
    assert chat[0] == chat[1]
    chunks = list(api.chat.completions.create(model=kind, messages=MESSAGES, max_tokens=6, seed=5, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat[0]
