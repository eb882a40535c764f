"""The one OpenAI-compatible HTTP client against a real HTTP server on 127.0.0.1: which failures are
retried, what the errors say, and that the key never leaks. (The same client against a real vLLM
server behind a misbehaving proxy: tests/probe/test_api_embedder.py.)"""

from __future__ import annotations

import logging
import pickle
import traceback

import pytest

from qalign.openai_http import ApiClient, ApiError, Secret, TransientError, secret_from_env
from qalign.server_process import free_port
from tests.http_stub import Reply, StubServer

KEY = "sk-qalign-HTTP-5c1d9e-never-print-me"
OK = Reply(200, {"data": [1, 2, 3]})


@pytest.fixture()
def stub():
    with StubServer() as server:
        yield server


def client_for(url: str, **options) -> ApiClient:
    return ApiClient(url, **{"max_retries": 3, "backoff_base": 0.01, "timeout": 5.0, **options})


def test_transient_failures_are_retried_then_answered(stub, caplog):
    stub.routes["POST /v1/embeddings"] = [
        Reply(429, {"error": "slow down"}, {"Retry-After": "0"}),
        Reply(503, "overloaded"),
        Reply(200, "{ cut mid-bo"),  # a success whose JSON body is cut short
        Reply(drop=True),
        OK,
    ]
    client = client_for(f"{stub.url}/v1", max_retries=4)
    with caplog.at_level(logging.WARNING, logger="qalign.openai_http"):
        assert client.post("/embeddings", {"input": ["a"]}) == {"data": [1, 2, 3]}
    assert stub.count("POST /v1/embeddings") == 5
    assert (client.requests_sent, client.retries) == (5, 4)
    assert caplog.text.count("retry") == 4 and f"{stub.url}/v1/embeddings" in caplog.text
    assert "HTTP 429" in caplog.text and "HTTP 503: overloaded" in caplog.text and "not JSON" in caplog.text
    assert all(seen.body == {"input": ["a"]} for seen in stub.seen)


def test_a_hung_request_times_out_and_is_retried(stub):
    stub.routes["POST /v1/completions"] = [Reply(200, {"late": True}, delay=2.0), Reply(200, {"late": False})]
    assert client_for(stub.url, timeout=0.5).post("/v1/completions", {}) == {"late": False}
    assert stub.count("POST /v1/completions") == 2


def test_a_rejected_request_fails_at_once_naming_the_endpoint(stub):
    stub.routes["POST /v1/completions"] = [Reply(400, {"message": "prompt too long"})]
    client = client_for(stub.url)
    with pytest.raises(ApiError) as rejected:
        client.post("/v1/completions", {"prompt": "x"})
    assert not isinstance(rejected.value, TransientError)
    assert rejected.value.status == 400
    assert str(rejected.value).startswith(f"{stub.url}/v1/completions rejected the request with HTTP 400")
    assert "prompt too long" in str(rejected.value)
    assert stub.count("POST /v1/completions") == 1


def test_retries_run_out_with_a_transient_error_naming_the_endpoint(stub):
    stub.routes["POST /v1/completions"] = [Reply(502, "bad gateway")]
    expected = r"/v1/completions failed after 3 attempts; last error: HTTP 502: bad gateway"
    with pytest.raises(TransientError, match=expected):
        client_for(stub.url, max_retries=2).post("/v1/completions", {})
    assert stub.count("POST /v1/completions") == 3
    # Nothing listens on the port: a refused connection is transient too.
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TransientError, match=rf"{url}/health failed after 1 attempt; last error: ConnectError"):
        client_for(url, max_retries=0).get("/health")


def test_plain_text_and_empty_answers_when_json_is_not_required(stub):
    stub.routes["POST /v1/load_lora_adapter"] = [Reply(200, "Success: LoRA adapter 'a' added successfully.")]
    stub.routes["POST /reset_prefix_cache"] = [Reply(200)]
    stub.routes["GET /v1/models"] = [Reply(200, {"data": [{"id": "tiny"}]})]
    client = client_for(stub.url)
    assert client.post("/v1/load_lora_adapter", {"lora_name": "a"}, expect_json=False).startswith("Success")
    assert client.post("/reset_prefix_cache", None, expect_json=False) is None
    assert client.get("/v1/models", expect_json=False) == {"data": [{"id": "tiny"}]}
    assert stub.seen[1].body is None and "Content-Type" not in stub.seen[1].headers


def test_map_yields_results_and_raises_the_first_failure(stub):
    stub.routes["POST /echo"] = lambda body: Reply(200, body) if body["i"] != 3 else Reply(401, "no")
    client = client_for(stub.url, max_concurrency=2)
    results = {}
    with pytest.raises(ApiError, match="401"):
        for index, answer in client.map(lambda i: client.post("/echo", {"i": i}), range(6)):
            results[index] = answer["i"]
    assert all(results[i] == i for i in results) and 3 not in results
    assert dict(client.map(lambda i: i * i, range(4))) == {0: 0, 1: 1, 2: 4, 3: 9}


def test_the_key_is_sent_but_never_shown(stub, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # every logger, httpx's and httpcore's included
    monkeypatch.setenv("QALIGN_TEST_HTTP_KEY", KEY + "\n")  # `cat keyfile` leaves a newline: stripped
    key = secret_from_env("QALIGN_TEST_HTTP_KEY", "test client")
    # A server that echoes the request's headers in its errors, until retries run out, then a 401.
    stub.routes["POST /v1/x"] = lambda body: Reply(500 if body["echo"] else 401, {"headers": stub.seen[-1].headers})
    client = client_for(f"{stub.url}/v1", api_key=key, max_retries=1)
    errors = []
    for echo in (True, False):
        with pytest.raises(ApiError) as failed:
            client.post("/x", {"echo": echo})
        errors.append(failed.value)
    assert stub.seen[0].headers["Authorization"] == f"Bearer {KEY}"
    assert all("***" in str(error) for error in errors), "the echoed Authorization header must be redacted"
    with pytest.raises(TypeError):
        pickle.dumps(key)
    monkeypatch.setenv("QALIGN_TEST_HTTP_KEY", KEY + "\nX")
    with pytest.raises(ApiError, match="QALIGN_TEST_HTTP_KEY contains whitespace") as invalid:
        secret_from_env("QALIGN_TEST_HTTP_KEY", "test client")
    monkeypatch.delenv("QALIGN_TEST_HTTP_KEY")
    with pytest.raises(ApiError, match="QALIGN_TEST_HTTP_KEY is not set"):
        secret_from_env("QALIGN_TEST_HTTP_KEY", "test client")
    captured = capfd.readouterr()
    shown = [repr(client), repr(key), str(key), f"{key}", caplog.text, captured.out, captured.err]
    shown += [str(e) + "".join(traceback.format_exception(e)) for e in [*errors, invalid.value]]
    assert "retry" in caplog.text and "httpcore" in caplog.text, "logging was captured"
    for text in shown:
        assert KEY not in text
    assert isinstance(key, Secret) and key.reveal() == KEY
