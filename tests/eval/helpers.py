"""Stand-in policies for eval tests that need no model."""

from __future__ import annotations

import random
from typing import Any

from qalign.rollout.base import Completion, SamplingConfig


class ScriptedPolicy:
    """Deterministic fake: its samples depend on the seed and on the whole chunk of prompts it is
    given (like batched HF generation, where padding and RNG order couple a batch's prompts)."""

    tokenizer = None

    def __init__(self, description: dict[str, Any] | None = None, as_text: bool = False):
        self.calls: list[tuple[list[str], int | None]] = []
        self.description = description or {"kind": "scripted"}
        self.as_text = as_text

    def describe(self) -> dict[str, Any]:
        return dict(self.description)

    def sample(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion | str]]:
        self.calls.append((list(prompts), sampling.seed))
        rng = random.Random(f"{sampling.seed}|{'||'.join(prompts)}")
        out = []
        for prompt in prompts:
            samples = []
            for _ in range(sampling.n):
                value = rng.randint(0, 20)
                text = f"Let me think. The answer is \\boxed{{{value}}}." if rng.random() < 0.9 else "No idea."
                samples.append(text if self.as_text else Completion([1, 2], [3] * rng.randint(1, 9), text, [], "stop"))
            out.append(samples)
        return out

    def close(self) -> None:
        pass
