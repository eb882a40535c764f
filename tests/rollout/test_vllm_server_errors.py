"""VLLMServerEngine's failure handling against real HTTP servers on 127.0.0.1 that answer like vLLM's
OpenAI-compatible server, but fail on cue: every call, weight sync included, goes through the one
client (``qalign.openai_http``), so a failing worker is dropped and a rejected request is reported
naming the endpoint, whichever call it was. (Real vLLM workers: test_vllm_server.py.)"""

from __future__ import annotations

import logging

import pytest

from qalign.openai_http import ApiError
from qalign.rollout import SamplingConfig, VLLMServerEngine
from tests.http_stub import Reply, StubServer


def completions(body) -> Reply:
    """A vLLM ``/v1/completions`` answer: token ids 7, 8 with log-prob -0.5 each, per prompt and sample."""
    choice = {"text": "ab", "token_ids": [7, 8], "logprobs": {"token_logprobs": [-0.5, -0.5]},
              "finish_reason": "length"}  # fmt: skip
    return Reply(200, {"choices": [dict(choice, index=i) for i in range(len(body["prompt"]) * body["n"])]})


def fake_vllm() -> StubServer:
    """Healthy, serving model ``tiny``; a test changes ``routes`` to make it fail."""
    return StubServer({
        "GET /health": [Reply(200)],
        "GET /v1/models": [Reply(200, {"object": "list", "data": [{"id": "tiny"}]})],
        "POST /v1/completions": completions,
        "POST /collective_rpc": [Reply(200, {"results": [None]})],
        "POST /reset_prefix_cache": [Reply(200)],
    })  # fmt: skip


@pytest.fixture()
def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=32)  # fmt: skip
    return LlamaForCausalLM(config)


def engine_for(*servers: StubServer, tmp_path) -> VLLMServerEngine:
    return VLLMServerEngine("tiny", urls=[s.url for s in servers], start_timeout=30, request_timeout=10,
                            max_retries=2, sync_dir=tmp_path)  # fmt: skip


def test_a_rejected_prefix_cache_reset_is_reported_naming_the_endpoint(tiny_model, tmp_path):
    """The reset after a reload used to bypass the client's error handling: a 400 there dropped the
    worker as if it had died and left only "no worker left alive"."""
    with fake_vllm() as server:
        server.routes["POST /reset_prefix_cache"] = [Reply(400, {"detail": "reset_prefix_cache is disabled"})]
        with engine_for(server, tmp_path=tmp_path) as engine:
            with pytest.raises(ApiError) as rejected:
                engine.sync_weights(tiny_model)
            assert str(rejected.value).startswith(f"{server.url}/reset_prefix_cache rejected the request with HTTP 400")
            assert "reset_prefix_cache is disabled" in str(rejected.value)
            assert engine.workers[0].alive, "a rejected request is not a dead worker"
            reload = next(s for s in server.seen if s.path == "/collective_rpc")
            assert reload.body["method"] == "reload_weights"
            assert (tmp_path / reload.body["kwargs"]["weights_path"] / "model.safetensors").is_file()


def test_a_worker_failing_the_weight_sync_is_dropped_and_the_others_keep_serving(tiny_model, tmp_path, caplog):
    with fake_vllm() as failing, fake_vllm() as healthy:
        failing.routes["POST /reset_prefix_cache"] = [Reply(503, "engine is dead")]
        with engine_for(failing, healthy, tmp_path=tmp_path) as engine:
            with caplog.at_level(logging.WARNING, logger="qalign.rollout.vllm_server"):
                engine.sync_weights(tiny_model)
            assert engine.in_sync
            assert [w.alive for w in engine.workers] == [False, True]
            reason = f"{failing.url}/reset_prefix_cache failed after 1 attempt; last error: HTTP 503: engine is dead"
            assert reason in caplog.text
            assert "failed the weight sync" in caplog.text
            results = engine.generate([[1, 2], [3]], SamplingConfig(n=2, max_tokens=2))
            assert [[c.completion_ids for c in group] for group in results] == [[[7, 8]] * 2] * 2
            assert failing.count("POST /v1/completions") == 0


def test_a_server_without_dev_mode_is_told_how_to_start(tiny_model, tmp_path):
    with fake_vllm() as server:
        del server.routes["POST /collective_rpc"]  # vLLM without VLLM_SERVER_DEV_MODE=1 answers 404
        with engine_for(server, tmp_path=tmp_path) as engine:
            advice = f"{server.url} has no /collective_rpc: start it with VLLM_SERVER_DEV_MODE=1"
            with pytest.raises(RuntimeError, match=advice):
                engine.sync_weights(tiny_model)


def test_generation_fails_over_from_a_failing_worker_and_reports_a_rejected_request(tmp_path, caplog):
    with fake_vllm() as failing, fake_vllm() as healthy, engine_for(failing, healthy, tmp_path=tmp_path) as engine:
        failing.routes["POST /v1/completions"] = [Reply(500, "CUDA error")]
        failing.routes["GET /health"] = [Reply(503)]
        with caplog.at_level(logging.WARNING, logger="qalign.rollout.vllm_server"):
            results = engine.generate([[1], [2], [3], [4]], SamplingConfig(n=1, max_tokens=2))
        assert all(group[0].logprobs == [-0.5, -0.5] for group in results)
        assert [w.alive for w in engine.workers] == [False, True]
        assert f"vLLM server worker {failing.url} failed" in caplog.text and "HTTP 500: CUDA error" in caplog.text
        sent = healthy.count("POST /v1/completions")
        healthy.routes["POST /v1/completions"] = [Reply(400, {"message": "max_tokens is too large"})]
        with pytest.raises(ApiError, match=f"{healthy.url}/v1/completions rejected the request with HTTP 400"):
            engine.generate([[1]], SamplingConfig(n=1, max_tokens=10**6))
        assert healthy.count("POST /v1/completions") == sent + 1, "a rejected request is not re-sent"
        assert engine.workers[1].inflight == 0
