"""Device defaults every qalign training config applies, and loss scaling across processes."""

from __future__ import annotations

import torch


def apply_device_defaults(args) -> None:
    """Unset ``bf16`` → bf16 where the GPU supports it; no CUDA → train on the CPU.

    The second matters for multi-process runs on CPU machines: processes started by torchrun each think
    they are alone unless the training arguments ask for the CPU, which is when accelerate forms a gloo
    group.
    """
    if getattr(args, "bf16", False) is None and not args.fp16:
        args.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if not torch.cuda.is_available():
        args.use_cpu = True


def token_mean_across_processes(loss: torch.Tensor, local_tokens: torch.Tensor, accelerator) -> torch.Tensor:
    """Turn this process's token-mean loss into its share of the token mean over all processes.

    DDP and DeepSpeed average gradients over processes, so a per-process token mean weighs every
    process equally however many tokens it had. Returning ``mean_local · n_local · P / n_all`` makes the
    averaged gradient (and the averaged logged loss) that of Σ_all / n_all, the same as one process on
    the whole batch.
    """
    processes = accelerator.num_processes
    if processes == 1:
        return loss
    local = local_tokens.detach().to(device=loss.device, dtype=torch.float32).reshape(1)
    total = accelerator.gather(local).sum().clamp(min=1.0)
    return loss * (local.squeeze(0) * processes / total)
