"""Bad requests, policy failures and the API key: every one answered with OpenAI's error JSON and the
right status, and the server answers the next good request. The key never shows in a response or a log."""

from __future__ import annotations

import concurrent.futures
import logging
import uuid

import httpx
import openai
import pytest

from qalign.serve.app import build_app
from tests.serve.conftest import EchoPolicy, client, hf_policy, running_server

PROMPT = "What is 3 + 4?"
CHAT = [{"role": "user", "content": "What is 9 - 4?"}]
COMPLETION = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4}
CHAT_BODY = {"model": "tiny", "messages": CHAT, "max_tokens": 4}


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    policy = hf_policy(tiny_model_dir)  # context 512 (max_position_embeddings), no chat template
    with running_server(build_app(policy, "tiny")) as base:
        yield base
    policy.close()


def post(url: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    if raw is not None:
        return httpx.post(url + path, content=raw, headers={"content-type": "application/json", **(headers or {})})
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> str:
    """The OpenAI error shape, exactly; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["type"] == ("invalid_request_error" if status < 500 and status != 401 else error["type"])
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error["message"]


def assert_still_serving(url: str) -> None:
    response = client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=3, seed=1)
    assert len(response.choices) == 1 and response.usage.completion_tokens == 3


C, CH = "/completions", "/chat/completions"
BAD_REQUESTS = [
    # (id, path, body, status, param, code, words in the message)
    ("unknown-model", C, {**COMPLETION, "model": "gpt-4"}, 404, "model", "model_not_found", "gpt-4"),
    ("unknown-model-chat", CH, {**CHAT_BODY, "model": "other"}, 404, "model", "model_not_found", "other"),
    ("not-an-object", C, [1, 2], 400, None, "invalid_json", "JSON object"),
    ("n-as-string", C, {**COMPLETION, "n": "two"}, 400, "n", None, "integer"),
    ("missing-prompt", C, {"model": "tiny"}, 400, "prompt", None, "required"),
    ("missing-messages", CH, {"model": "tiny"}, 400, "messages", None, "required"),
    ("bad-role", CH, {**CHAT_BODY, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", None, "user"),
    ("tool-calls", CH, {**CHAT_BODY, "messages": [{**CHAT[0], "tool_calls": []}]}, 400, "messages.0.tool_calls", None, "Extra"),
    ("image-part", CH, {**CHAT_BODY, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "messages.0.content.0.type", None, "text"),
    ("empty-messages", CH, {**CHAT_BODY, "messages": []}, 400, "messages", None, "at least one"),
    ("token-prompt", C, {**COMPLETION, "prompt": [1, 2, 3]}, 400, "prompt", "unsupported_parameter", "token-id"),
    ("empty-prompt", C, {**COMPLETION, "prompt": ""}, 400, "prompt", None, "empty"),
    ("empty-prompt-list", C, {**COMPLETION, "prompt": []}, 400, "prompt", None, "empty"),
    ("n-zero", C, {**COMPLETION, "n": 0}, 400, "n", None, "got 0"),
    ("n-too-many", C, {**COMPLETION, "n": 129}, 400, "n", None, "128"),
    ("max-tokens-zero", C, {**COMPLETION, "max_tokens": 0}, 400, "max_tokens", None, "at least 1"),
    ("max-completion-tokens-zero", CH, {**CHAT_BODY, "max_tokens": None, "max_completion_tokens": 0}, 400, "max_completion_tokens", None, "at least 1"),
    ("max-tokens-disagree", CH, {**CHAT_BODY, "max_completion_tokens": 5}, 400, "max_completion_tokens", None, "disagree"),
    ("beyond-context", C, {**COMPLETION, "max_tokens": 510}, 400, "max_tokens", "context_length_exceeded", "512"),
    ("beyond-context-chat", CH, {**CHAT_BODY, "max_tokens": 600}, 400, "max_tokens", "context_length_exceeded", "512"),
    ("prompt-fills-context", C, {**COMPLETION, "prompt": "7 " * 600}, 400, "prompt", "context_length_exceeded", "512"),
    ("temperature-negative", C, {**COMPLETION, "temperature": -0.5}, 400, "temperature", None, ">= 0"),
    ("top-p-zero", C, {**COMPLETION, "top_p": 0}, 400, "top_p", None, "(0, 1]"),
    ("top-p-above-one", CH, {**CHAT_BODY, "top_p": 1.5}, 400, "top_p", None, "(0, 1]"),
    ("seed-too-big", C, {**COMPLETION, "seed": 2**64}, 400, "seed", None, "seed"),
    ("logprobs", C, {**COMPLETION, "logprobs": 1}, 400, "logprobs", "unsupported_parameter", "logprobs"),
    ("logprobs-zero", C, {**COMPLETION, "logprobs": 0}, 400, "logprobs", "unsupported_parameter", "logprobs"),
    ("chat-logprobs", CH, {**CHAT_BODY, "logprobs": True}, 400, "logprobs", "unsupported_parameter", "logprobs"),
    ("echo", C, {**COMPLETION, "echo": True}, 400, "echo", "unsupported_parameter", "echo"),
    ("best-of", C, {**COMPLETION, "best_of": 3}, 400, "best_of", "unsupported_parameter", "best_of"),
    ("suffix", C, {**COMPLETION, "suffix": "!"}, 400, "suffix", "unsupported_parameter", "suffix"),
    ("logit-bias", C, {**COMPLETION, "logit_bias": {"5": 10}}, 400, "logit_bias", "unsupported_parameter", "logit_bias"),
    ("presence-penalty", C, {**COMPLETION, "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter", "presence_penalty"),
    ("frequency-penalty", CH, {**CHAT_BODY, "frequency_penalty": -1}, 400, "frequency_penalty", "unsupported_parameter", "frequency_penalty"),
    ("tools", CH, {**CHAT_BODY, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter", "tools"),
    ("response-format", CH, {**CHAT_BODY, "response_format": {"type": "json_object"}}, 400, "response_format", "unsupported_parameter", "response_format"),
    ("unknown-field", C, {**COMPLETION, "frobnicate": 1}, 400, "frobnicate", "unknown_parameter", "frobnicate"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code", "words"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_then_a_good_one(url, path, body, status, param, code, words):
    message = assert_error(post(url, path, body), status, param, code)
    assert words in message
    assert_still_serving(url)


def test_malformed_json_is_400_not_422(url):
    for raw in (b'{"model": "tiny", "prompt": ', b"\xff\xfe", b""):
        assert "not valid JSON" in assert_error(post(url, C, raw=raw), 400, None, "invalid_json")
    assert_still_serving(url)


def test_unknown_route_and_method(url):
    assert_error(httpx.get(url + "/engines"), 404, None, "not_found")
    assert_error(httpx.get(url + C), 405, None, "method_not_allowed")
    assert_still_serving(url)


def test_the_openai_client_raises_its_usual_errors(url):
    api = client(url)
    with pytest.raises(openai.BadRequestError) as raised:
        api.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=-1)
    assert raised.value.status_code == 400 and raised.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nope", messages=CHAT)
    assert_still_serving(url)


def test_a_policy_exception_is_a_500_and_the_server_stays_up(tiny_tokenizer):
    policy = EchoPolicy(tiny_tokenizer)
    with running_server(build_app(policy, "tiny", batch_window_ms=500)) as base:
        response = post(base, C, {"model": "tiny", "prompt": "BOOM now"})
        assert response.status_code == 500
        body = response.json()["error"]
        assert body["type"] == "server_error" and body["code"] == "policy_error"
        assert "RuntimeError: the policy broke on purpose" in body["message"]
        assert post(base, C, {"model": "tiny", "prompt": "fine"}).json()["choices"][0]["text"] == "fine|0"
        streamed = post(base, CH, {"model": "tiny", "messages": [{"role": "user", "content": "BOOM"}], "stream": True})
        assert streamed.status_code == 500 and streamed.json()["error"]["code"] == "policy_error"  # before any chunk

        # In a shared call, one failing request fails alone: the call is retried request by request.
        prompts = ["a", "b", "BOOM c", "d"]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: post(base, C, {"model": "tiny", "prompt": p, "max_tokens": 8}), prompts))
        assert [a.status_code for a in answers] == [200, 200, 500, 200]
        assert [a.json()["choices"][0]["text"] for a in answers if a.status_code == 200] == ["a|0", "b|0", "d|0"]
        assert [len(call) for call in policy.calls[3:]] == [4, 1, 1, 1, 1], "one shared call, then one by one"


@pytest.fixture
def key() -> str:
    return f"sk-test-{uuid.uuid4().hex}"


def test_api_key_is_required_and_never_shown(tiny_tokenizer, key, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    policy = EchoPolicy(tiny_tokenizer, secret=key)  # its failure message quotes the key
    app = build_app(policy, "tiny", api_key=key)
    with running_server(app, log_level="debug") as base:  # log_config None: uvicorn's records reach caplog
        for headers in (
            {},
            {"Authorization": f"Bearer {key}x"},
            {"Authorization": key},
            {"Authorization": f"Basic {key}"},
        ):
            message = assert_error(
                post(base, C, {"model": "tiny", "prompt": "x"}, headers=headers), 401, None, "invalid_api_key"
            )
            assert key not in message
        assert_error(httpx.get(base + "/models"), 401, None, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            client(base, api_key="wrong").completions.create(model="tiny", prompt="x")
        assert httpx.get(base.removesuffix("/v1") + "/health").status_code == 200  # health stays open

        good = client(base, api_key=key)
        assert good.completions.create(model="tiny", prompt="hello", max_tokens=8).choices[0].text == "hello|0"
        assert [m.id for m in good.models.list().data] == ["tiny"]
        with pytest.raises(openai.InternalServerError) as raised:
            good.completions.create(model="tiny", prompt="BOOM")
        assert key not in str(raised.value.body) and "***" in raised.value.body["message"]
    out, err = capfd.readouterr()
    assert "401" in caplog.text or "401" in out + err, "the requests were logged"
    assert key not in caplog.text and key not in out and key not in err
