"""The one rollout interface every sampler in qalign goes through.

Training, offline collection, Q# data collection, Q-probe sampling and evaluation all call
``engine.generate(prompts, sampling)``; the backend (HF ``generate``, vLLM in-process, vLLM
server workers) is a config choice. Prompts are token-id lists: templating (chat template,
few-shot) happens once, upstream, so every backend sees exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


class RolloutUnavailable(RuntimeError):
    """Every rollout worker has failed, so no more samples can come: restart the workers and resume."""


@dataclass
class SamplingConfig:
    """Sampling parameters shared by every backend (vLLM names)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k, as in HF; vLLM's "-1" is mapped by its engine
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Completion:
    """One sampled completion of one prompt.

    ``logprobs[t]`` is the log-probability the *sampler* gave ``completion_ids[t]`` (after
    temperature), which TRL uses for its importance-sampling correction.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS or stop string) or "length"


@runtime_checkable
class RolloutEngine(Protocol):
    """What every backend implements."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """Sample ``sampling.n`` completions for each prompt; result[i] belongs to prompts[i]."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (full or LoRA adapter)."""
        ...

    def close(self) -> None:
        """Release processes and memory."""
        ...
