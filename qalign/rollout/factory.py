"""``build_engine``: the ``rollout:`` config section turned into a ``RolloutEngine``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qalign.rollout.base import RolloutEngine
    from qalign.rollout.config import RolloutArguments


def build_engine(
    rollout_args: RolloutArguments,
    model: torch.nn.Module | str,
    tokenizer=None,
    *,
    seed: int = 0,
    max_model_len: int | None = None,
    **overrides: Any,
) -> RolloutEngine:
    """Build the engine ``rollout_args.rollout_backend`` names.

    Args:
        model: the model being trained (vLLM starts from its current weights) or an HF folder path.
        seed: engine seed when ``rollout_seed`` is unset (the trainer passes its own seed).
        max_model_len: fallback when ``rollout_max_model_len`` is unset (the trainer passes
            prompt + completion budget when it knows it).
        overrides: backend-specific keyword arguments, passed on as they are.
    """
    backend = rollout_args.rollout_backend
    if backend == "auto":
        raise ValueError("rollout.backend auto reached build_engine unresolved: resolve it first with "
                         "qalign.rollout.backend.resolve_backend")  # fmt: skip
    if backend == "hf":
        from qalign.rollout.hf import HFEngine

        return HFEngine(model, tokenizer, **overrides)
    common = dict(
        dtype=rollout_args.rollout_dtype,
        max_model_len=rollout_args.rollout_max_model_len or max_model_len,
        gpu_memory_utilization=rollout_args.rollout_gpu_memory_utilization,
        enforce_eager=_enforce_eager(rollout_args.rollout_enforce_eager),
        seed=seed if rollout_args.rollout_seed is None else rollout_args.rollout_seed,
        max_lora_rank=rollout_args.rollout_max_lora_rank,
    )
    if backend == "vllm":
        from qalign.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer, **{**common, **overrides})
    if backend == "vllm_server":
        from qalign.rollout.vllm_server import VLLMServerEngine

        server = dict(
            urls=list(rollout_args.rollout_server_urls),
            num_servers=rollout_args.rollout_num_servers,
            host=rollout_args.rollout_server_host,
            port=rollout_args.rollout_server_port,
            start_timeout=rollout_args.rollout_server_start_timeout,
            request_timeout=rollout_args.rollout_request_timeout,
            max_retries=rollout_args.rollout_max_retries,
            sync_dir=rollout_args.rollout_sync_dir,
        )
        return VLLMServerEngine(model, tokenizer, **{**common, **server, **overrides})
    raise ValueError(f"unknown rollout backend {backend!r}")


def _enforce_eager(setting: bool | None) -> bool:
    """Unset means eager on CPU (vLLM's CPU backend has no CUDA graphs) and CUDA graphs on GPUs."""
    if setting is not None:
        return setting
    import torch

    return not torch.cuda.is_available()
