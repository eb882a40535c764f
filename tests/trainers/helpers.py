"""Small pieces the trainer tests share."""

from __future__ import annotations

from datasets import Dataset

from qalign.data.arithmetic import generate


def digit_fraction_reward(completions, **kwargs) -> list[float]:
    """A dense reward a random tiny model can move: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def tiny_prompt_dataset(size: int = 32) -> Dataset:
    rows = generate("train", size=size)
    return Dataset.from_list([{"prompt": row["question"] + "\n", "answer": row["answer"]} for row in rows])


def tiny_grpo_kwargs(output_dir, **overrides) -> dict:
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        bf16=False,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return kwargs
