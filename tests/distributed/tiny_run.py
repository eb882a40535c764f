"""Launched by the distributed tests: a few steps of one qalign trainer on the tiny model, on every rank.

Each rank writes ``rank<k>.json`` with the world size, its rank, the logged losses/rewards and a checksum
of the full (gathered) trained parameters, so the tests can compare ranks, strategies and runs.

    accelerate launch ... tests/distributed/tiny_run.py MODEL_DIR OUT_DIR ALGORITHM MAX_STEPS \
        [--resume CHECKPOINT] [--rollouts FOLDER] [--lora] [--rollout hf|vllm] [--async-steps K] [--sft-coef λ]

ALGORITHM is a registered trainer (grpo, qae, shiq, dqo, qsharp) or ``dqo_model`` (DQO with a separate
value trunk). Without a launcher it runs as one process, with the same global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qalign.models import load_model, load_tokenizer  # noqa: E402
from qalign.trainers.registry import config_class, trainer_class  # noqa: E402
from tests.trainers.helpers import digit_fraction_reward, tiny_grpo_kwargs, tiny_prompt_dataset  # noqa: E402

GLOBAL_BATCH = 16  # completions per optimizer step, whatever the number of processes
# A collective that one process never joins fails after this many seconds (gloo's default is 30 min).
COLLECTIVE_TIMEOUT = 120
OFFLINE_GLOBAL_BATCH = 8  # rollouts per optimizer step (the tiny rollout set has 8)


def full_state_checksum(trainer) -> list[float]:
    """Sum and sum of squares of every trained parameter, on every rank (ZeRO-3 shards gathered first)."""
    import contextlib

    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if getattr(trainer.accelerator.state.deepspeed_plugin, "zero_stage", None) == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        # FSDP2 parameters are DTensor shards: full_tensor() all-gathers them (a collective on every rank).
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]
        total = sum(p.detach().double().sum().item() for p in full)
        squares = sum(p.detach().double().pow(2).sum().item() for p in full)
    return [total, squares]


def generate_unequally(trainer) -> int:
    """Greedy completions of 1 + rank prompts, one per batch, through the engine ``qalign.train`` evaluates
    with: processes run different numbers of forwards, so none may be a collective (ZeRO-3 gathers and
    takes its hooks off; FSDP2 unshards). A forward that communicated would hang here."""
    from qalign.rollout.base import SamplingConfig
    from qalign.train import heldout_engine

    prompts = [[5, 6, 7]] * (1 + trainer.accelerator.process_index)
    with heldout_engine(trainer, trainer.processing_class, batch_size=1) as engine:
        return len(engine.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=4)))


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def build_online(algorithm: str, model_dir: str, out_dir: Path, max_steps: int, world: int, lora: bool,
                 rollout: str, async_steps: int = 0, sft_coef: float = 0.0):  # fmt: skip
    from qalign.rollout.config import RolloutArguments

    # With the anchor, a threshold the dense test reward passes only sometimes: some micro-batches then have no
    # successes, and their rank skips the anchor's extra forward while the other runs it.
    anchor = {"sft_coef": sft_coef, "sft_reward_threshold": 0.05} if sft_coef else {}
    config = config_class(algorithm)(
        **tiny_grpo_kwargs(out_dir, max_steps=max_steps, save_strategy="steps", save_steps=1,
                           lr_scheduler_type="constant", per_device_train_batch_size=GLOBAL_BATCH // world,
                           ddp_timeout=COLLECTIVE_TIMEOUT, **anchor)
    )  # fmt: skip
    return trainer_class(algorithm)(
        model=load_model(model_dir),
        reward_funcs=[digit_fraction_reward],
        args=config,
        train_dataset=tiny_prompt_dataset(),
        processing_class=load_tokenizer(model_dir),
        peft_config=lora_config() if lora else None,
        rollout_args=RolloutArguments(
            rollout_backend=rollout, rollout_max_model_len=128, rollout_async_steps=async_steps
        ),
    )


def build_offline(algorithm: str, model_dir: str, out_dir: Path, max_steps: int, world: int, rollouts: str, lora: bool):
    from qalign.data.rollouts import load_rollouts
    from tests.trainers.test_shiq import tiny_kwargs

    # ShiQ averages over all action tokens of the global batch (the normaliser that needs the token count
    # across processes); DQO per sequence.
    overrides = {"shiq": {"loss_normalizer": "token"}, "dqo_model": {"value_function": "model"}}.get(algorithm, {})
    algorithm = "dqo" if algorithm == "dqo_model" else algorithm
    # learning_rate 1e-3 (not the unit tests' 1e-2): Adam's first step moves every weight by ~lr whatever
    # the gradient's size, so a larger rate would turn float-rounding differences between the
    # single-process and the two-process gradient into visible parameter differences.
    config = config_class(algorithm)(
        **tiny_kwargs(out_dir, max_steps=max_steps, save_strategy="steps", save_steps=1, learning_rate=1e-3,
                      lr_scheduler_type="constant", per_device_train_batch_size=OFFLINE_GLOBAL_BATCH // world,
                      ddp_timeout=COLLECTIVE_TIMEOUT, **overrides)
    )  # fmt: skip
    return trainer_class(algorithm)(
        model=load_model(model_dir),
        args=config,
        train_dataset=load_rollouts(rollouts),
        processing_class=load_tokenizer(model_dir),
        peft_config=lora_config() if lora else None,
    )


def build_qsharp(model_dir: str, out_dir: Path, world: int, lora: bool):
    from qalign.trainers.qsharp import QSharpConfig, QSharpTrainer
    from tests.trainers.test_qsharp import even_first_token_reward

    # Two iterations, so the second collection rolls in with the guided policy of the first value model.
    args = QSharpConfig(
        output_dir=str(out_dir), value_num_layers=1, num_iterations=2, num_samples_per_prompt=4,
        max_completion_length=6, collection_chunk_size=2, guidance_top_k=8, eta=0.5, learning_rate=1e-3,
        num_train_epochs=2, per_device_train_batch_size=16 // world, logging_steps=1, report_to="none",
        seed=0, dataloader_num_workers=0, lr_scheduler_type="constant", ddp_timeout=COLLECTIVE_TIMEOUT,
        # Full batches only: a short last batch is topped up with repeated examples under several
        # processes (accelerate's even_batches), which one process would not see.
        dataloader_drop_last=True,
    )  # fmt: skip
    return QSharpTrainer(model_dir, args, load_model(model_dir), load_tokenizer(model_dir), tiny_prompt_dataset(8),
                         [even_first_token_reward], peft_config=lora_config() if lora else None)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("algorithm")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--rollouts", default=None)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--rollout", default="hf", help="rollout.backend of the online trainers")
    parser.add_argument("--async-steps", type=int, default=0, help="rollout.async_steps of the online trainers")
    parser.add_argument("--sft-coef", type=float, default=0.0, help="the SFT anchor's λ of the online trainers")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))

    if args.algorithm in ("grpo", "qae"):
        trainer = build_online(args.algorithm, args.model_dir, args.out_dir, args.max_steps, world, args.lora,
                               args.rollout, args.async_steps, args.sft_coef)  # fmt: skip
    elif args.algorithm == "qsharp":
        trainer = build_qsharp(args.model_dir, args.out_dir, world, args.lora)
    else:
        trainer = build_offline(args.algorithm, args.model_dir, args.out_dir, args.max_steps, world, args.rollouts,
                                args.lora)  # fmt: skip
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(str(args.out_dir / "final"))
    generated = generate_unequally(trainer)
    record = {
        "world_size": trainer.accelerator.num_processes,
        "rank": trainer.accelerator.process_index,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "zero_stage": getattr(trainer.accelerator.state.deepspeed_plugin, "zero_stage", None),
        "losses": {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log},
        "rewards": {log["step"]: log["reward"] for log in trainer.state.log_history if "reward" in log},
        "sft_nll": [log["grpo/sft_nll"] for log in trainer.state.log_history if "grpo/sft_nll" in log],
        "checksum": full_state_checksum(trainer),
        "generated_prompts": generated,
        # max |log π_sampler − log π_trained| over the completions (vLLM backends): ~0 only when the
        # engine holds the trained (gathered) weights.
        "sampling_logp_max": [
            log["sampling/sampling_logp_difference/max"]
            for log in trainer.state.log_history
            if "sampling/sampling_logp_difference/max" in log
        ],
        # rollout.async_steps: how many steps behind the trained weights each step's batch was sampled.
        "staleness": [
            log["rollout/staleness/max"] for log in trainer.state.log_history if "rollout/staleness/max" in log
        ],
    }
    (args.out_dir / f"rank{record['rank']}.json").write_text(json.dumps(record))
    trainer.accelerator.end_training()  # tear the process group down before exit, as qalign.train does


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    from qalign.distributed import exit_without_teardown

    exit_without_teardown(0)  # as qalign.train does
