"""Greedy held-out accuracy: the ``before: <acc> after: <acc>`` line every trainer prints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from qalign.rollout.base import RolloutEngine, SamplingConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def heldout_accuracy(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    answers: list[str],
    max_tokens: int,
    fallback_last_number: bool = False,
    batch_size: int = 32,
    desc: str = "held-out accuracy",
    show_progress: bool = True,
) -> float:
    """Fraction of ``prompts`` whose greedy completion grades equal to the gold answer."""
    from qalign.reward import grade

    sampling = SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens)
    correct = 0
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not show_progress):
        chunk = prompts[start : start + batch_size]
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        outputs = engine.generate(prompt_ids, sampling)
        for completions, gold in zip(outputs, answers[start : start + batch_size]):
            correct += grade(completions[0].text, gold, fallback_last_number=fallback_last_number)
    return correct / max(len(prompts), 1)
