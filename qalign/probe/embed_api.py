"""φ(x, a) from any OpenAI-compatible ``/v1/embeddings`` endpoint (OpenAI, vLLM, TEI, …).

Texts are deduplicated, looked up in the on-disk cache, and only the missing ones are sent, in
batches of ``batch_size`` with at most ``max_concurrency`` requests in flight. Each batch is written
to the cache as soon as it is answered: a job killed halfway resumes where it stopped and a second
run over the same texts sends no request at all.

``EmbeddingServer`` serves a local embedding model (e.g. the bundled MiniLM) with vLLM's
OpenAI-compatible server on 127.0.0.1 (a ``qalign.server_process.ServerProcess``), for running the API
path without an external service.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qalign.openai_http import ApiClient, ApiError, secret_from_env
from qalign.probe.embed_cache import EmbeddingCache
from qalign.probe.embedders import DEFAULT_TEXT_FORMAT, candidate_text, resolve_embedding_model
from qalign.probe.sampling import Candidate

logger = logging.getLogger(__name__)


class OpenAIEmbedder:
    """Embeddings through ``POST {base_url}/embeddings``.

    Args:
        base_url: API root including ``/v1`` (e.g. ``http://127.0.0.1:8000/v1``).
        model: the model name the server knows.
        api_key_env: name of the environment variable holding the key (None: send no key). The key
            itself is never stored in the config, logged, or put in an error message.
        cache_path: sqlite cache file; None disables the cache.
        dimensions: optional output size (OpenAI's text-embedding-3 models accept it); part of the cache key.
        text_format: how (prompt, completion) become one string.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        *,
        batch_size: int = 64,
        max_concurrency: int = 4,
        max_retries: int = 6,
        timeout: float = 60.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        cache_path: str | Path | None = None,
        dimensions: int | None = None,
        text_format: str = DEFAULT_TEXT_FORMAT,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.dimensions = dimensions
        self.text_format = text_format
        self.client = ApiClient(
            base_url, secret_from_env(api_key_env, "embedder"), timeout=timeout, max_retries=max_retries,
            backoff_base=backoff_base, backoff_max=backoff_max, max_concurrency=max_concurrency,
        )  # fmt: skip
        self.cache = EmbeddingCache(cache_path) if cache_path else None
        self.cache_hits = 0

    def __repr__(self) -> str:
        return f"OpenAIEmbedder(model={self.model!r}, client={self.client!r})"

    @property
    def cache_model(self) -> str:
        """The model half of the cache key."""
        return self.model if self.dimensions is None else f"{self.model}@{self.dimensions}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "openai", "model": self.cache_model, "text_format": self.text_format}

    def embed(self, candidates: Sequence[Candidate]) -> torch.Tensor:
        return self.embed_texts([candidate_text(c, self.text_format) for c in candidates])

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, d)`` float32 embeddings of ``texts``."""
        unique = list(dict.fromkeys(texts))
        vectors: dict[str, np.ndarray] = {}
        if self.cache is not None:
            for text, vector in zip(unique, self.cache.get_many(self.cache_model, unique)):
                if vector is not None:
                    vectors[text] = vector
            self.cache_hits += len(vectors)
        missing = [t for t in unique if t not in vectors]
        batches = [missing[s : s + self.batch_size] for s in range(0, len(missing), self.batch_size)]
        if batches:
            logger.info("embedding %d texts in %d requests (%d cached)", len(missing), len(batches), len(vectors))
        for index, batch_vectors in self.client.map(self._request, batches):
            batch = batches[index]
            if self.cache is not None:  # saved per batch: a crash later loses nothing answered
                self.cache.put_many(self.cache_model, batch, batch_vectors)
            vectors.update(zip(batch, batch_vectors))
        if not texts:
            return torch.empty(0, 0)
        return torch.from_numpy(np.stack([vectors[t] for t in texts]).astype(np.float32))

    def _request(self, batch: list[str]) -> list[np.ndarray]:
        payload: dict[str, Any] = {"model": self.model, "input": batch, "encoding_format": "float"}
        if self.dimensions is not None:
            payload["dimensions"] = self.dimensions
        response = self.client.post("/embeddings", payload)
        data = sorted(response.get("data") or [], key=lambda item: item["index"])
        if len(data) != len(batch):
            raise ApiError(f"/embeddings returned {len(data)} vectors for {len(batch)} inputs")
        return [np.asarray(item["embedding"], dtype=np.float32) for item in data]

    def close(self) -> None:
        self.client.close()
        if self.cache is not None:
            self.cache.close()


class EmbeddingServer:
    """A vLLM OpenAI-compatible server of an embedding model on 127.0.0.1 (``--runner pooling``).

    ``base_url`` is the API root (``http://127.0.0.1:PORT/v1``); the model is served as ``served_name``.
    ``api_key_env`` names an environment variable whose key the server will require (``--api-key`` is
    passed through the server's environment, VLLM_API_KEY, so it never appears in a command line).
    """

    def __init__(
        self,
        model: str = "minilm",
        served_name: str | None = None,
        api_key_env: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout: float = 600.0,
        extra_args: Sequence[str] = (),
    ):
        from qalign.server_process import ServerProcess, free_port, wait_until_healthy

        self.served_name = served_name or model
        self._workdir = Path(tempfile.mkdtemp(prefix="qalign-embed-server-"))
        args = ["--runner", "pooling", "--dtype", "float32", "--enforce-eager", "--served-model-name", self.served_name]
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default reserves far more
        key = secret_from_env(api_key_env, "embedding server")
        if key is not None:
            env["VLLM_API_KEY"] = key.reveal()
        log = self._workdir / "server.log"
        port = port or free_port(host)
        self.process = ServerProcess.vllm(resolve_embedding_model(model), host, port, log, [*args, *extra_args], env)
        self.url = self.process.url
        self.base_url = f"{self.url}/v1"
        try:
            wait_until_healthy(self.url, start_timeout, self.process)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.process.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddingServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
