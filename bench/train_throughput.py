"""Training throughput per trainer: tokens/s and MFU, next to TRL's own trainers on the same tokens.

    python bench/grpo_step.py make-model /tmp/q05 --tokenizer ~/.cache/qalign/models/SmolLM2-135M-Instruct
    python bench/train_throughput.py --model /tmp/q05 --steps 5 --json /tmp/throughput.json
    # CPU smoke run:  make-model /tmp/tiny --preset tiny --dtype float32 ... then
    python bench/train_throughput.py --model /tmp/tiny --dtype float32 --batch 8 --prompt-length 16 \
        --completion-length 32 --steps 3

Every trainer sees the same shape: ``--batch`` sequences of ``--prompt-length`` prompt tokens plus
``--completion-length`` completion tokens per optimizer step.

- ``sft``: TRL's SFTTrainer on the token ids (prompt + completion; loss on every token).
- ``shiq``, ``dqo``: qalign's offline trainers on the same ids as rollouts (random rewards; the reference
  statistics are the model's own, computed before the timed steps). The goal is ≤ 1.5x an SFT step.
- ``trl_grpo``, ``grpo``: TRL's GRPOTrainer and qalign's on the same config (HF generation; a random
  model never samples EOS, so every completion is ``--completion-length`` tokens). Goal: qalign/TRL ≥ 0.98.
- ``shiq_online``: online ShiQ on GRPO's config (same sampling, ShiQ's loss and reference statistics in
  place of GRPO's); reported as its step time over GRPO's.

``--rounds R`` runs the whole list R times, the order reversed every other round (A B C, C B A, ...), so
that a machine whose load drifts during the run slows every trainer alike; each ratio is taken within a
round and the median over rounds is reported with its range. On a shared machine only these ratios mean
anything, never the seconds.

tokens/s counts prompt + completion tokens per optimizer step over the median step time (the first
``--warmup`` steps excluded). MFU = 6 · N · tokens/s / peak, N the parameter count (embeddings included,
attention FLOPs left out), peak the device's dense bf16 peak: so GRPO's MFU also pays for generation,
which is its point. A CPU has no peak to divide by unless ``--peak-tflops`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
TRAINERS = ("sft", "shiq", "dqo", "trl_grpo", "grpo", "shiq_online")
# What each trainer is compared with: "step" ratios (goal ≤ 1.5 for the offline ones) or, for qalign's GRPO
# against TRL's, a tokens/s ratio (goal ≥ 0.98).
BASELINE = {"shiq": "sft", "dqo": "sft", "grpo": "trl_grpo", "shiq_online": "grpo"}


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def token_rows(tokenizer, count: int, prompt_length: int, completion_length: int, seed: int) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    high = len(tokenizer) - 1
    rows = []
    # No reference statistics: the offline trainers compute them from the model when they are built, before the
    # timed steps, as for data sampled from π_ref (DQO's importance weights then start at 1). Made-up log-probs
    # put its cumulative weights near 1e-40 after a few tokens, and the denormal floats that spread through the
    # backward pass made a CPU step 2-3x slower.
    for _ in range(count):
        ids = torch.randint(3, high, (prompt_length + completion_length,), generator=generator).tolist()
        rows.append({"prompt_ids": ids[:prompt_length], "completion_ids": ids[prompt_length:],
                     "reward": float(torch.rand(1, generator=generator) < 0.5)})  # fmt: skip
    return rows


class StepTimer:
    """A TrainerCallback (built lazily so importing this file needs no transformers) timing each step."""

    def __new__(cls, cuda: bool):
        import torch
        from transformers import TrainerCallback

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        class _Timer(TrainerCallback):
            def __init__(self):
                self.start, self.steps = 0.0, []

            def on_step_begin(self, *_, **__):
                sync()
                self.start = time.perf_counter()

            def on_step_end(self, *_, **__):
                sync()
                self.steps.append(time.perf_counter() - self.start)

        return _Timer()


def build_trainer(name: str, args, model, tokenizer, rows: list[dict], timer):
    import torch
    from datasets import Dataset

    cuda = torch.cuda.is_available()
    common = dict(output_dir=f"{args.output_dir}/{name}", max_steps=args.steps, learning_rate=1e-6, logging_steps=1,
                  save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
                  bf16=cuda and args.dtype == "bfloat16", gradient_checkpointing=args.gradient_checkpointing,
                  per_device_train_batch_size=args.batch // args.grad_accum,
                  gradient_accumulation_steps=args.grad_accum)  # fmt: skip
    if name == "sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"input_ids": r["prompt_ids"] + r["completion_ids"]} for r in rows])
        config = SFTConfig(**common, max_length=args.prompt_length + args.completion_length, packing=False,
                           padding_free=False, dataset_num_proc=None)  # fmt: skip
        return SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    if name in ("shiq", "dqo"):
        from qalign.trainers.registry import config_class, trainer_class

        config = config_class(name)(**common, max_prompt_length=args.prompt_length,
                                    max_completion_length=args.completion_length)  # fmt: skip
        return trainer_class(name)(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                   processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    # GRPO: the prompts are decoded back to text so both trainers tokenize the same strings.
    prompts = [tokenizer.decode(r["prompt_ids"]) for r in rows]
    data = Dataset.from_list([{"prompt": p} for p in prompts])

    def digit_fraction(completions, **kwargs) -> list[float]:
        return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]

    grpo = dict(common, num_generations=args.num_generations, max_completion_length=args.completion_length,
                shuffle_dataset=False)  # fmt: skip
    if name == "trl_grpo":
        import trl

        return trl.GRPOTrainer(model=model, reward_funcs=[digit_fraction], args=trl.GRPOConfig(**grpo),
                               train_dataset=data, processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    if name == "shiq_online":
        from qalign.trainers.shiq import ShiQOnlineConfig, ShiQOnlineTrainer

        return ShiQOnlineTrainer(model=model, reward_funcs=[digit_fraction], args=ShiQOnlineConfig(**grpo),
                                 train_dataset=data, processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    from qalign.trainers.grpo import GRPOConfig, GRPOTrainer

    return GRPOTrainer(model=model, reward_funcs=[digit_fraction], args=GRPOConfig(**grpo), train_dataset=data,
                       processing_class=tokenizer, callbacks=[timer])  # fmt: skip


def measure(name: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    parameters = sum(p.numel() for p in model.parameters())
    # GRPO takes batch/num_generations prompts per step; the others one row per sequence.
    rows_needed = args.batch * args.steps
    rows = token_rows(tokenizer, rows_needed, args.prompt_length, args.completion_length, seed=0)
    timer = StepTimer(cuda)
    trainer = build_trainer(name, args, model, tokenizer, rows, timer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steady = timer.steps[args.warmup :] or timer.steps
    step_seconds = statistics.median(steady)
    tokens_per_step = args.batch * (args.prompt_length + args.completion_length)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_flops(device, args.peak_tflops)
    tokens_per_second = tokens_per_step / step_seconds
    result = {
        "trainer": name, "device": device, "parameters": parameters, "step_seconds": step_seconds,
        "all_step_seconds": timer.steps, "tokens_per_step": tokens_per_step, "tokens_per_second": tokens_per_second,
        "mfu": 6 * parameters * tokens_per_second / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }  # fmt: skip
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def merge_round(results: dict[str, dict], name: str, result: dict, peak: float | None) -> None:
    """Add one round's measurement of ``name``: the step time becomes the median of the rounds' medians."""
    merged = results.setdefault(name, {**result, "round_step_seconds": [], "all_step_seconds": []})
    merged["round_step_seconds"].append(result["step_seconds"])
    merged["all_step_seconds"] += result["all_step_seconds"]
    if result["peak_memory_gib"] is not None:
        merged["peak_memory_gib"] = max(merged["peak_memory_gib"], result["peak_memory_gib"])
    merged["step_seconds"] = statistics.median(merged["round_step_seconds"])
    merged["tokens_per_second"] = merged["tokens_per_step"] / merged["step_seconds"]
    merged["mfu"] = 6 * merged["parameters"] * merged["tokens_per_second"] / peak if peak else None


def round_ratios(results: dict[str, dict], name: str) -> list[float] | None:
    """``name`` against its baseline within each round: step-time ratios, or tokens/s for GRPO vs TRL."""
    base = results.get(BASELINE.get(name, ""))
    if base is None:
        return None
    pairs = zip(results[name]["round_step_seconds"], base["round_step_seconds"], strict=True)
    if name == "grpo":  # tokens/s ratio at equal tokens per step = the inverse step-time ratio
        return [b / a for a, b in pairs]
    return [a / b for a, b in pairs]


def table(results: dict[str, dict]) -> str:
    lines = ["| trainer | step s | tokens/s | MFU | vs |", "|---|---|---|---|---|"]
    what = {"grpo": "x TRL GRPO tokens/s", "shiq_online": "x a GRPO step"}
    for name, r in results.items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        versus = ""
        if (ratios := round_ratios(results, name)) is not None:
            versus = f"{statistics.median(ratios):.3f}{what.get(name, 'x an SFT step')}"
            if len(ratios) > 1:
                versus += f" (rounds {min(ratios):.3f}–{max(ratios):.3f})"
        lines.append(f"| {name} | {r['step_seconds']:.3f} | {r['tokens_per_second']:,.0f} | {mfu} | {versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder (bench/grpo_step.py make-model)")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help=f"comma-separated, from {TRAINERS}")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the median")
    parser.add_argument("--rounds", type=int, default=1, help="run the list this often, alternating its order")
    parser.add_argument("--batch", type=int, default=32, help="sequences per optimizer step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--completion-length", type=int, default=384)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: known GPUs' bf16)")
    parser.add_argument("--output-dir", default="/tmp/qalign-throughput")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    unknown = set(args.trainers.split(",")) - set(TRAINERS)
    if unknown:
        parser.error(f"unknown trainer(s) {sorted(unknown)}; valid: {', '.join(TRAINERS)}")
    if args.rounds < 1 or args.steps <= args.warmup:
        parser.error(f"need --rounds ≥ 1 and --steps > --warmup, got {args.rounds} and {args.steps} > {args.warmup}")

    names = args.trainers.split(",")
    results: dict[str, dict] = {}
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            result = measure(name, args)
            merge_round(results, name, result, peak_flops(result["device"], args.peak_tflops))
            print(f"round {round_index + 1}/{args.rounds} {name}: {result['step_seconds']:.3f} s/step, "
                  f"{result['tokens_per_second']:,.0f} tok/s", flush=True)  # fmt: skip
    results = {name: results[name] for name in names}
    print(f"device: {next(iter(results.values()))['device']}; {args.batch} x ({args.prompt_length} + "
          f"{args.completion_length}) tokens per step; dtype {args.dtype}")  # fmt: skip
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
