"""The server end to end with the real ``openai`` client: the tiny model (with a chat template) behind
``build_app`` on a loopback port. Every answer is compared with the same policy sampled directly."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from qalign.data.prompts import render_prompt
from qalign.rollout.base import SamplingConfig
from qalign.serve.app import build_app
from qalign.serve.responses import cut_at_stop
from tests.serve.conftest import client, hf_policy, running_server

PROMPT = "What is 3 + 4?"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 9 - 4?"}]


@pytest.fixture(scope="module")
def served(chat_model_dir):
    policy = hf_policy(chat_model_dir)
    with running_server(build_app(policy, "tiny")) as url:
        yield policy, url
    policy.close()


@pytest.fixture(scope="module")
def policy(served):
    return served[0]


@pytest.fixture(scope="module")
def api(served):
    return client(served[1])


def direct(policy, prompts, **sampling):
    """What the policy answers when sampled in-process (the server is idle meanwhile)."""
    return policy.sample(prompts, SamplingConfig(**sampling))


def test_models_and_health(served, api):
    assert [m.id for m in api.models.list().data] == ["tiny"]
    card = api.models.retrieve("tiny")
    assert card.id == "tiny" and card.object == "model" and card.owned_by == "qalign"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4")
    health = httpx.get(served[1].removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": "tiny"}


def test_completion_is_the_policys_sample(policy, api):
    response = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, seed=5, temperature=1.0)
    [expected] = direct(policy, [PROMPT], n=1, max_tokens=8, seed=5, temperature=1.0)[0]
    assert response.object == "text_completion" and response.model == "tiny" and response.id.startswith("cmpl-")
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert (choice.index, choice.text, choice.finish_reason) == (0, expected.text, expected.finish_reason)
    prompt_ids = policy.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]  # templated tokenizer: no BOS
    assert response.usage.prompt_tokens == len(prompt_ids) == len(expected.prompt_ids)
    assert response.usage.completion_tokens == len(expected.completion_ids) == 8  # no EOS in 8 random tokens
    assert response.usage.total_tokens == len(prompt_ids) + 8


def test_usage_counts_the_returned_text(policy, api):
    """The completion tokens are the tokens of the returned text (the tiny tokenizer re-encodes it as sampled
    when no EOS was drawn; a greedy answer is checked here)."""
    response = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    [expected] = direct(policy, [PROMPT], n=1, max_tokens=6, temperature=0)[0]
    assert response.choices[0].text == expected.text
    assert policy.tokenizer.decode(expected.completion_ids, skip_special_tokens=True) == response.choices[0].text
    assert response.usage.completion_tokens == len(expected.completion_ids)


def test_chat_is_rendered_with_the_chat_template(policy, api):
    response = api.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=7, seed=3)
    rendered = render_prompt(policy.tokenizer, "", messages=MESSAGES)
    assert rendered == "<|system|>Be brief.\n<|user|>What is 9 - 4?\n<|assistant|>"
    [expected] = direct(policy, [rendered], n=1, max_tokens=7, seed=3)[0]
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    message = response.choices[0].message
    assert (message.role, message.content) == ("assistant", expected.text)
    templated = policy.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    templated = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert response.usage.prompt_tokens == len(templated) == len(expected.prompt_ids)
    assert response.usage.completion_tokens == len(expected.completion_ids)
    # max_tokens means the same as max_completion_tokens; developer is a system turn to a template.
    again = api.chat.completions.create(
        model="tiny", messages=[{"role": "developer", "content": "Be brief."}, MESSAGES[1]], max_tokens=7, seed=3
    )
    assert again.choices[0].message.content == expected.text


def test_same_seed_same_text_other_seed_other_text(api):
    texts = [
        api.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, seed=s).choices[0].text for s in (1, 1, 2)
    ]
    assert texts[0] == texts[1] != texts[2]


def test_n_choices_and_a_list_of_prompts(policy, api):
    response = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, n=3, seed=9)
    expected = direct(policy, [PROMPT], n=3, max_tokens=5, seed=9)[0]
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [e.text for e in expected]
    assert response.usage.completion_tokens == sum(len(e.completion_ids) for e in expected)
    assert response.usage.prompt_tokens == len(expected[0].prompt_ids)  # the prompt counts once, not n times

    prompts = [PROMPT, "Ana has 5 apples."]
    response = api.completions.create(model="tiny", prompt=prompts, max_tokens=4, n=2, seed=4)
    groups = direct(policy, prompts, n=2, max_tokens=4, seed=4)
    assert [c.text for c in response.choices] == [c.text for g in groups for c in g]  # prompt-major order
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage.prompt_tokens == sum(len(g[0].prompt_ids) for g in groups)

    chat = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2, seed=4)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content


def test_temperature_zero_is_greedy(policy, api):
    texts = {
        api.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
        for _ in range(2)
    }
    assert texts == {direct(policy, [PROMPT], n=1, max_tokens=6, temperature=0)[0][0].text}


def test_stream_reassembles_to_the_same_text(api):
    whole = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, seed=7)
    chunks = list(
        api.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=10, seed=7, stream=True, stream_options={"include_usage": True}
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert len(text_chunks) >= 2 and all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    whole = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, seed=7, n=2)
    chunks = list(api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, seed=7, n=2, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[index].message.content
        assert mine[-1].finish_reason == whole.choices[index].finish_reason


def test_stream_wire_format(served):
    url = served[1]
    with httpx.stream(
        "POST",
        f"{url}/completions",
        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "seed": 1, "stream": True},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        body = json.loads(event.removeprefix("data: "))
        assert set(body) == {"id", "object", "created", "model", "choices"}
        assert set(body["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}


def test_stop_strings_end_the_text(policy, api):
    free = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, seed=21).choices[0].text
    # A stop string from the middle of the free answer: ASCII letters or digits, found first at >= 2.
    stop = next(
        free[i : i + 2] for i in range(2, len(free) - 2) if free[i : i + 2].isalnum() and free[i : i + 2].isascii()
        and free.find(free[i : i + 2]) == i
    )  # fmt: skip
    response = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, seed=21, stop=[stop, "never-seen"])
    [expected] = direct(policy, [PROMPT], n=1, max_tokens=12, seed=21, stop=[stop, "never-seen"])[0]
    choice = response.choices[0]
    assert choice.text == cut_at_stop(expected.text, [stop])[0] == free[: free.index(stop)]
    assert choice.finish_reason == "stop"
    assert response.usage.completion_tokens == len(expected.completion_ids)
    streamed = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, seed=21, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_harmless_fields_are_accepted(api):
    response = api.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=2, seed=1, user="someone", presence_penalty=0, echo=False,
        extra_body={"metadata": {"a": "b"}, "top_k": 5},
    )  # fmt: skip
    assert len(response.choices) == 1
