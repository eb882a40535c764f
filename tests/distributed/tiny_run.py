"""Launched by the distributed tests: a few GRPO/QAE steps of the tiny model on every rank.

Each rank writes ``rank<k>.json`` with the world size, its rank, the logged losses and a checksum
of the full (gathered) parameters after training, so the test can compare ranks and runs.
    accelerate launch ... tests/distributed/tiny_run.py MODEL_DIR OUT_DIR ALGORITHM MAX_STEPS [RESUME]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qalign.models import load_model, load_tokenizer  # noqa: E402
from qalign.trainers.registry import config_class, trainer_class  # noqa: E402
from tests.trainers.helpers import digit_fraction_reward, tiny_grpo_kwargs, tiny_prompt_dataset  # noqa: E402


def full_state_checksum(trainer) -> list[float]:
    """Sum and sum of squares of every parameter, on every rank (ZeRO-3 shards gathered first)."""
    import contextlib

    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if getattr(trainer.accelerator.state.deepspeed_plugin, "zero_stage", None) == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        total = sum(p.detach().double().sum().item() for p in params)
        squares = sum(p.detach().double().pow(2).sum().item() for p in params)
    return [total, squares]


def main() -> None:
    model_dir, out_dir, algorithm, max_steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    resume = sys.argv[5] if len(sys.argv) > 5 else None
    global_batch = 16
    config = config_class(algorithm)(
        **tiny_grpo_kwargs(out_dir, max_steps=max_steps, save_strategy="steps", save_steps=1, lr_scheduler_type="constant",
                           per_device_train_batch_size=global_batch // int(_world_size()))
    )
    trainer = trainer_class(algorithm)(
        model=load_model(model_dir),
        reward_funcs=[digit_fraction_reward],
        args=config,
        train_dataset=tiny_prompt_dataset(),
        processing_class=load_tokenizer(model_dir),
    )
    trainer.train(resume_from_checkpoint=resume)
    checksum = full_state_checksum(trainer)
    record = {
        "world_size": trainer.accelerator.num_processes,
        "rank": trainer.accelerator.process_index,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "zero_stage": getattr(trainer.accelerator.state.deepspeed_plugin, "zero_stage", None),
        "losses": {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log},
        "rewards": {log["step"]: log["reward"] for log in trainer.state.log_history if "reward" in log},
        "checksum": checksum,
    }
    (out_dir / f"rank{record['rank']}.json").write_text(json.dumps(record))


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
