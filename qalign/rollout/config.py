"""``rollout:`` config section (flattened to ``rollout_*`` keys): which engine samples, and how."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("hf",)


@dataclass
class RolloutArguments:
    rollout_backend: str = field(
        default="hf", metadata={"help": f"Rollout engine: one of {BACKENDS} (hf = transformers generate)."}
    )

    def __post_init__(self) -> None:
        if self.rollout_backend not in BACKENDS:
            raise ValueError(f"rollout.backend {self.rollout_backend!r} is not one of {BACKENDS}")
