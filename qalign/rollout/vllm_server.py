"""Rollouts through OpenAI-compatible vLLM server workers, load-balanced, with failover.

Workers are either started here (``python -m vllm.entrypoints.openai.api_server`` subprocesses on
free ports of 127.0.0.1) or already running and given by URL. Prompts go to the ``/v1/completions``
endpoint as token-id lists with ``return_token_ids`` and ``logprobs=0`` (the sampled token's log-prob,
``--logprobs-mode processed_logprobs``), so no text round trip can change the tokens.

Load balancing: requests are spread over the live workers, each to the one with the fewest requests
in flight. A request that fails transiently is re-sent to another worker (up to ``max_retries`` times);
a worker that fails its ``/health`` check afterwards is marked dead, reported with a logged warning, and
gets no more work. Every request, weight sync included, goes through the worker's
``qalign.openai_http.ApiClient``, so all of them share its error handling; the server processes
themselves are managed by ``qalign.server_process``.

Weight sync (both through endpoints vLLM 0.32 serves with ``VLLM_SERVER_DEV_MODE=1``):

* full weights: the model is written once as safetensors to a local folder and every worker is told
  to reload from it in place (``POST /collective_rpc`` with ``method=reload_weights``, vLLM's own
  in-place reload), then its prefix cache is reset (``POST /reset_prefix_cache``). Writing to disk
  costs one write per sync for any number of workers; the folder must be visible to the workers
  (same host or shared filesystem). vLLM's network transfer engines (NCCL, CUDA IPC) need GPUs.
* LoRA: only the adapter is written and loaded as a new named adapter
  (``POST /v1/load_lora_adapter``, needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``);
  the previous one is unloaded.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qalign.openai_http import ApiClient, ApiError, TransientError
from qalign.rollout.base import Completion, RolloutUnavailable, SamplingConfig
from qalign.rollout.vllm_engine import runs_on_cpu
from qalign.rollout.weight_sync import dtype_name, is_peft_model, save_adapter, save_base_model
from qalign.server_process import ServerProcess, free_port, healthy, wait_until_healthy

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    """A server as the load balancer sees it."""

    url: str
    client: ApiClient  # no retries of its own: a failed request is re-sent to another worker
    process: ServerProcess | None = None
    model_name: str = ""
    alive: bool = True
    inflight: int = 0
    served: int = 0  # requests answered, for tests and logs
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class VLLMServerEngine:
    """``RolloutEngine`` over one or more vLLM server workers.

    Args:
        model: the model being trained (its weights seed the servers qalign starts) or an HF folder path.
        tokenizer: saved with the weights (servers detokenize and apply stop strings).
        urls: already running servers; empty = start ``num_servers`` here.
        server_args: extra ``api_server`` command-line arguments for started servers.
        sync_dir: folder for the weight/adapter files the servers load (default: a local temporary one;
            servers on other nodes need a shared filesystem path).
    """

    backend = "vllm_server"  # the rollout.backend name that builds it

    def __init__(
        self,
        model: torch.nn.Module | str,
        tokenizer=None,
        *,
        urls: list[str] | None = None,
        num_servers: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = True,
        seed: int = 0,
        enable_lora: bool | None = None,
        max_lora_rank: int = 64,
        start_timeout: float = 900.0,
        request_timeout: float = 900.0,
        max_retries: int = 3,
        server_args: list[str] | None = None,
        sync_dir: str | Path | None = None,
    ):
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        # Weights and adapters reach the servers as files: on other nodes they must read the same path.
        if sync_dir is not None:
            Path(sync_dir).mkdir(parents=True, exist_ok=True)
        self._workdir = Path(tempfile.mkdtemp(prefix="qalign-vllm-server-", dir=sync_dir))
        self._lora_name: str | None = None
        self._version = 0
        is_path = isinstance(model, (str, Path))
        self.enable_lora = (not is_path and is_peft_model(model)) if enable_lora is None else enable_lora
        if urls:
            self.workers = [self._worker(url.rstrip("/")) for url in urls]
            # Unknown weights on external servers: the trainer syncs before its first generation.
            self.in_sync = False
        else:
            model_dir = str(model) if is_path else str(save_base_model(model, tokenizer, self._workdir / "base"))
            if dtype == "auto" and not is_path:
                dtype = dtype_name(model)
            args = ["--dtype", dtype, "--seed", str(seed), "--logprobs-mode", "processed_logprobs"]
            args += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
            if enforce_eager:
                args.append("--enforce-eager")
            if max_model_len:
                args += ["--max-model-len", str(max_model_len)]
            if self.enable_lora:
                args += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", "1"]
            if runs_on_cpu() and not any("chunked-prefill" in a for a in server_args or []):
                args.append("--no-enable-chunked-prefill")  # see vllm_engine.CPU_NO_CHUNKED_PREFILL
            args += list(server_args or [])
            env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
            if self.enable_lora:
                env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
            self.workers = []
            for i in range(num_servers):
                worker_port = port + i if port else free_port(host)
                log = self._workdir / f"server-{i}.log"
                process = ServerProcess.vllm(model_dir, host, worker_port, log, args, env)
                self.workers.append(self._worker(process.url, process))
            self.in_sync = True
        self._pool = ThreadPoolExecutor(max_workers=max(8, 4 * len(self.workers)), thread_name_prefix="qalign-vllm")
        # Servers we started must not outlive us, even if close() is never called (interpreter exit).
        self._finalizer = weakref.finalize(
            self, _stop_all, [w.process for w in self.workers if w.process is not None], self._workdir
        )
        try:
            list(self._pool.map(lambda w: wait_until_healthy(w.url, start_timeout, w.process), self.workers))
            for worker in self.workers:
                worker.model_name = worker.client.get("/v1/models", timeout=30)["data"][0]["id"]
        except BaseException:
            self.close()
            raise

    def _worker(self, url: str, process: ServerProcess | None = None) -> Worker:
        return Worker(url, ApiClient(url, timeout=self.request_timeout, max_retries=0), process)

    # ------------------------------------------------------------------ balancing

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    def _acquire(self, exclude: Worker | None = None) -> Worker:
        """The live worker with the fewest requests in flight (another one than ``exclude`` if possible)."""
        live = self.live_workers()
        if not live:
            raise RolloutUnavailable(f"every vLLM server worker failed ({', '.join(w.url for w in self.workers)})")
        candidates = [w for w in live if w is not exclude] or live
        worker = min(candidates, key=lambda w: w.inflight)
        with worker.lock:
            worker.inflight += 1
        return worker

    def _release(self, worker: Worker, ok: bool) -> None:
        with worker.lock:
            worker.inflight -= 1
            worker.served += ok

    def _report_failure(self, worker: Worker, error: Exception) -> None:
        """Mark ``worker`` dead if it is not healthy any more, with a warning (once)."""
        if worker.alive and ((worker.process is not None and not worker.process.alive()) or not healthy(worker.client)):
            worker.alive = False
            logger.warning(
                "vLLM server worker %s failed (%s); its requests go to the %d remaining worker(s)",
                worker.url, error, len(self.live_workers()),
            )  # fmt: skip

    @staticmethod
    def _post(worker: Worker, path: str, payload: dict[str, Any] | None, timeout: float | None = None) -> Any:
        """POST to one worker. ``TransientError``: the worker failed (another may answer); ``ApiError``:
        the request itself is wrong, and re-sending it elsewhere would fail the same way."""
        # Plain-text answers allowed: e.g. /v1/load_lora_adapter answers in text, /reset_prefix_cache with nothing.
        return worker.client.post(path, payload, timeout=timeout, expect_json=False)

    def _with_failover(self, path: str, make_payload) -> Any:
        """POST to the least loaded worker; on a worker failure, re-send elsewhere (``max_retries`` times)."""
        last_error: Exception | None = None
        worker: Worker | None = None
        for _ in range(self.max_retries + 1):
            worker = self._acquire(exclude=worker)
            try:
                result = self._post(worker, path, make_payload(worker))
            except TransientError as error:
                self._release(worker, ok=False)
                last_error = error
                self._report_failure(worker, error)
                continue
            except BaseException:
                self._release(worker, ok=False)  # a rejected request must not leave the worker looking busy
                raise
            self._release(worker, ok=True)
            return result
        raise RuntimeError(f"vLLM request failed after {self.max_retries + 1} attempts: {last_error}")

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """Sample ``sampling.n`` completions per prompt over the live workers."""
        if not prompts:
            return []
        if sampling.seed is not None:
            # The API takes one seed per request and would give equal prompts equal samples:
            # one request per prompt, seeded ``seed + i * n`` as in the in-process engine.
            batches = [([i], sampling.seed + i * sampling.n) for i in range(len(prompts))]
        else:
            # Several requests per worker so that a slow or failed one holds back little work.
            size = max(1, math.ceil(len(prompts) / (4 * max(1, len(self.live_workers())))))
            batches = [(list(range(s, min(s + size, len(prompts)))), None) for s in range(0, len(prompts), size)]
        results: list[list[Completion] | None] = [None] * len(prompts)

        def run(batch: tuple[list[int], int | None]) -> None:
            indices, seed = batch
            body = self._completion_body([prompts[i] for i in indices], sampling, seed)
            response = self._with_failover("/v1/completions", lambda w: {**body, "model": self._model_for(w)})
            choices = response["choices"]
            if len(choices) != len(indices) * sampling.n:
                raise RuntimeError(f"vLLM returned {len(choices)} choices for {len(indices)} x {sampling.n}")
            for k, i in enumerate(indices):
                group = choices[k * sampling.n : (k + 1) * sampling.n]
                results[i] = [_to_completion(prompts[i], choice) for choice in group]

        list(self._pool.map(run, batches))
        return results  # type: ignore[return-value]

    def _model_for(self, worker: Worker) -> str:
        return self._lora_name or worker.model_name

    @staticmethod
    def _completion_body(prompts: list[list[int]], sampling: SamplingConfig, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": [list(p) for p in prompts],
            "n": sampling.n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "max_tokens": sampling.max_tokens,
            "logprobs": 0,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        if seed is not None:
            body["seed"] = seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        return body

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push ``model`` (full weights, or its LoRA adapter) to every live worker."""
        self._version += 1
        if is_peft_model(model):
            path = save_adapter(model, self._workdir / f"adapter-{self._version}")
            name = f"qalign-{self._version}"
            self._on_all_workers(lambda w: self._load_adapter(w, name, str(path)))
            previous, self._lora_name = self._lora_name, name
            if previous is not None:
                self._on_all_workers(lambda w: self._post(w, "/v1/unload_lora_adapter", {"lora_name": previous}))
                shutil.rmtree(self._workdir / f"adapter-{self._version - 1}", ignore_errors=True)
        else:
            path = save_base_model(model, None, self._workdir / "weights")
            self._on_all_workers(lambda w: self._reload(w, str(path)))
        self.in_sync = True

    def _load_adapter(self, worker: Worker, name: str, path: str) -> None:
        self._post(worker, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def _reload(self, worker: Worker, path: str) -> None:
        try:
            self._post(worker, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}})
        except ApiError as error:
            if error.status == 404:
                raise RuntimeError(
                    f"{worker.url} has no /collective_rpc: start it with VLLM_SERVER_DEV_MODE=1"
                ) from error
            raise
        # KV blocks cached under the old weights must not be reused.
        self._post(worker, "/reset_prefix_cache", None, timeout=60)

    def _on_all_workers(self, action) -> None:
        """Run ``action`` on every live worker in parallel; a worker that fails it is dropped (it would serve stale weights)."""

        def one(worker: Worker) -> None:
            try:
                action(worker)
            except TransientError as error:
                worker.alive = False
                logger.warning("vLLM server worker %s failed the weight sync (%s); dropping it", worker.url, error)

        list(self._pool.map(one, self.live_workers()))
        if not self.live_workers():
            raise RolloutUnavailable(
                f"every vLLM server worker failed the weight sync ({', '.join(w.url for w in self.workers)})"
            )

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop the servers started here and delete the temp folder."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for worker in getattr(self, "workers", []):
            worker.alive = False
            worker.client.close()
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        else:  # failed before the finalizer existed
            _stop_all([w.process for w in getattr(self, "workers", []) if w.process is not None], self._workdir)

    def __enter__(self) -> VLLMServerEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop_all(processes: list[ServerProcess], workdir: Path) -> None:
    for process in processes:
        process.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def _to_completion(prompt_ids: list[int], choice: dict[str, Any]) -> Completion:
    ids = list(choice.get("token_ids") or [])
    logprobs = [
        float("nan") if lp is None else lp for lp in ((choice.get("logprobs") or {}).get("token_logprobs") or [])
    ]
    return Completion(list(prompt_ids), ids, choice.get("text", ""), logprobs, choice.get("finish_reason") or "length")
