"""Small pieces the trainer tests share."""

from __future__ import annotations

from pathlib import Path

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


# A dense reward a random tiny model can earn (share of digits): with the verifier's 0/1 reward it
# would almost always score 0, and ShiQ at zero reward rightly does not move.
DENSE_REWARD = "tests.trainers.helpers:digit_fraction_reward"


def write_collect_yaml(path: Path, model_dir: Path, output_dir: Path, **overrides) -> Path:
    config = dict(model_name_or_path=str(model_dir), dataset_name="arithmetic", prompt_template="plain",
                  reward_funcs=[DENSE_REWARD], max_prompts=4, num_samples=2, max_tokens=6, prompts_per_shard=2,
                  output_dir=str(output_dir), seed=0, rollout_backend="hf")  # fmt: skip
    config.update(overrides)
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path
