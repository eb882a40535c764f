"""The eval loop: sample n completions per problem from a ``Policy``, grade them, append one JSONL
row per (problem, sample) as it goes, and summarise.

Reproducibility and resume
--------------------------
Problems are generated in fixed chunks: problem ``i`` belongs to chunk ``i // problems_per_call``
(``i`` is its row number in the benchmark), and each chunk is one ``policy.sample`` call seeded
with ``chunk_seed(seed, benchmark, chunk)``. What a problem gets therefore depends only on the
settings and its chunk, never on which problems ran before, so a resumed run produces the same
rows as an uninterrupted one.

Rows live in ``qalign.sample_store``'s store ``samples/<benchmark>.jsonl``, one append per chunk. On
restart every chunk whose rows are all present is skipped, and a chunk with some rows missing is
sampled again (same seed, so same samples) and only its missing rows are appended. Settings that
change the samples are stored in ``samples/<benchmark>.meta.json``; resuming with different ones is
refused (``overwrite: true`` starts over), and so is resuming on a data file whose problems changed since.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qalign.eval.benchmarks import Problem, load_benchmark
from qalign.eval.config import EvalArguments
from qalign.policies import EnginePolicy, Policy  # re-exported: callers import them from here too
from qalign.rollout.base import Completion, SamplingConfig
from qalign.sample_store import SampleStore, chunk_seed

__all__ = [
    "EnginePolicy",
    "Policy",
    "derive_seed",
    "engine_policy_description",
    "evaluate_benchmark",
    "load_policy",
    "run_eval",
]

logger = logging.getLogger(__name__)

derive_seed = chunk_seed  # eval's older name: chunk_seed(seed, benchmark, chunk) is the seed it always used


# ----------------------------------------------------------------------------- policies


def engine_policy_description(args: EvalArguments) -> dict[str, Any]:
    """The ``describe()`` of the policy ``load_policy(args)`` builds, without loading anything."""
    return {
        "kind": "engine",
        "model": args.model_name_or_path,
        "base_model": args.base_model_name_or_path,
        "dtype": args.dtype,
        "backend": args.rollout_backend,
        "batch_size": args.batch_size if args.rollout_backend == "hf" else None,
        "rollout_dtype": args.rollout_dtype if args.rollout_backend != "hf" else None,
    }


def load_policy(args: EvalArguments) -> Policy:
    """The policy ``args`` names: ``policy`` (any saved kind, ``qalign.policies.load_policy``) or
    ``model_name_or_path`` (full folder, hub id, or LoRA adapter folder), behind the configured backend."""
    from qalign.policies import load_model_policy
    from qalign.policies import load_policy as load_saved_policy

    if args.policy is not None and args.policy_kind not in ("model", "lora"):
        return load_saved_policy(args.policy, backend=args.rollout_backend, dtype=args.dtype,
                                 batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    return load_model_policy(
        args.model_name_or_path, args.rollout_arguments(), dtype=args.dtype, batch_size=args.batch_size,
        seed=args.seed, base_model=args.base_model_name_or_path, work_dir=args.output_dir,
        description=engine_policy_description(args),
    )  # fmt: skip


# ----------------------------------------------------------------------------- the loop

RESTART = "overwrite: true, or another output_dir"  # how a user starts a refused store over


def _sampling_settings(args: EvalArguments) -> dict[str, Any]:
    return {
        "n": args.n,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_tokens": args.max_tokens,
        "stop": args.stop,
        "seed": args.seed,
        "problems_per_call": args.problems_per_call,
    }


def _generation_meta(args: EvalArguments, benchmark: str, policy: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes a row: a resume must match it exactly."""
    return {
        "benchmark": benchmark,
        "policy": policy,
        "prompt_template": args.prompt_template,
        "system_prompt": args.system_prompt,
        "chat_template_kwargs": args.chat_template_kwargs,
        "fallback_last_number": args.fallback_last_number,
        **_sampling_settings(args),
    }


def _chunks(problems: Sequence[Problem], per_call: int) -> list[list[Problem]]:
    chunks: dict[int, list[Problem]] = {}
    for problem in problems:
        chunks.setdefault(problem.index // per_call, []).append(problem)
    return list(chunks.values())


def evaluate_benchmark(
    name: str,
    problems: Sequence[Problem],
    args: EvalArguments,
    get_policy: Callable[[], Policy],
    policy_description: dict[str, Any],
) -> dict[str, Any]:
    """Sample and grade every missing (problem, sample) of one benchmark, then summarise it.

    ``get_policy`` is only called when something is left to sample, so re-running a finished eval
    loads no model. Returns the benchmark's summary (see ``summarize_rows``).
    """
    from tqdm.auto import tqdm

    from qalign.data.prompts import render_prompt

    path = Path(args.output_dir) / "samples" / f"{name}.jsonl"
    store = SampleStore(
        path,
        _generation_meta(args, name, policy_description),
        restart=RESTART,
        overwrite=args.overwrite,
        key=lambda row: (row["index"], row["sample"]),
    )
    try:
        store.refuse_other_problems({p.index: (p.question, p.answer) for p in problems}, index="index")
        chunks = _chunks(problems, args.problems_per_call)
        pending = [c for c in chunks if any((p.index, s) not in store.rows for p in c for s in range(args.n))]
        done = len(problems) - sum(len(c) for c in pending)
        if done:
            logger.info("%s: resuming, %d of %d problems already sampled", name, done, len(problems))
        bar = tqdm(total=len(problems), initial=done, desc=name, unit="problem", disable=not args.show_progress)
        for chunk in pending:
            policy = get_policy()
            seed = chunk_seed(args.seed, name, chunk[0].index // args.problems_per_call)
            sampling = SamplingConfig(
                n=args.n,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                max_tokens=args.max_tokens,
                seed=seed,
                stop=args.stop,
            )
            prompts = [
                render_prompt(
                    policy.tokenizer,
                    p.question,
                    args.prompt_template,
                    args.system_prompt,
                    args.chat_template_kwargs,
                    p.messages,
                )
                for p in chunk
            ]
            outputs = policy.sample(prompts, sampling)
            if len(outputs) != len(chunk) or any(len(o) != args.n for o in outputs):
                raise RuntimeError(
                    f"policy returned {[len(o) for o in outputs]} completions for {len(chunk)} prompts x n={args.n}"
                )
            rows = [
                _make_row(name, problem, s, seed, completion, args.fallback_last_number)
                for problem, completions in zip(chunk, outputs)
                for s, completion in enumerate(completions)
                if (problem.index, s) not in store.rows
            ]
            store.append(rows)
            bar.update(len(chunk))
        bar.close()
        selected = [[store.rows[(p.index, s)] for s in range(args.n)] for p in problems]
    finally:
        store.close()
    return summarize_rows(selected, args.ks)


def _make_row(
    benchmark: str, problem: Problem, sample: int, seed: int, completion: Completion | str, fallback: bool
) -> dict[str, Any]:
    from qalign.reward import extract_answer, grade

    text = completion if isinstance(completion, str) else completion.text
    return {
        "benchmark": benchmark,
        "index": problem.index,
        "id": problem.id,
        "sample": sample,
        "seed": seed,
        "question": problem.question,
        "gold": problem.answer,
        "completion": text,
        "extracted": extract_answer(text, fallback_last_number=fallback),
        "correct": bool(grade(text, problem.answer, fallback_last_number=fallback)),
        "finish_reason": None if isinstance(completion, str) else completion.finish_reason,
        "completion_tokens": None if isinstance(completion, str) else len(completion.completion_ids),
    }


def summarize_rows(rows_by_problem: Sequence[Sequence[dict[str, Any]]], k_values: Sequence[int]) -> dict[str, Any]:
    """Benchmark summary from its rows (``rows_by_problem[j]`` = problem j's rows in sample order):
    metrics plus answer-extraction and truncation rates. Computed from rows only, so a resumed
    run and an uninterrupted one summarise identically."""
    from qalign.eval.metrics import answer_key, summarize_problems

    per_problem = [
        ([r["correct"] for r in rows], [answer_key(r["extracted"]) for r in rows]) for rows in rows_by_problem
    ]
    flat = [row for rows in rows_by_problem for row in rows]
    tokens = [r["completion_tokens"] for r in flat if r.get("completion_tokens") is not None]
    return {
        "problems": len(rows_by_problem),
        "n": len(rows_by_problem[0]) if rows_by_problem else 0,
        "samples": len(flat),
        **summarize_problems(per_problem, k_values),
        "answered": sum(r["extracted"] is not None for r in flat) / len(flat),
        "truncated": sum(r.get("finish_reason") == "length" for r in flat) / len(flat),
        "mean_completion_tokens": sum(tokens) / len(tokens) if tokens else None,
    }


def run_eval(args: EvalArguments, policy: Policy | None = None) -> dict[str, Any]:
    """Evaluate ``policy`` (default: the model in ``args``) on every benchmark in ``args``, write
    samples, ``summary.json``, ``summary.md`` and ``pass_at_k.png`` to ``args.output_dir``, print
    one summary line per benchmark, and return the run summary."""
    from qalign.eval import report

    started = time.monotonic()
    # Data first: a missing file or unreachable hub fails before minutes of model loading.
    problems = {name: load_benchmark(name, args.data_files.get(name), args.limit) for name in args.benchmarks}
    if policy is None and args.policy is not None and args.policy_kind not in ("model", "lora"):
        # A guided or best-of-k policy describes itself once loaded (its value model, probe, sampler).
        owned = policy = load_policy(args)
    else:
        owned = None
    description = policy.describe() if policy is not None else engine_policy_description(args)
    loaded: list[Policy] = [policy] if policy is not None else []

    def get_policy() -> Policy:
        if not loaded:
            loaded.append(load_policy(args))
        return loaded[0]

    try:
        results = {
            name: evaluate_benchmark(name, problems[name], args, get_policy, description) for name in args.benchmarks
        }
    finally:
        if (policy is None or policy is owned) and loaded:
            loaded[0].close()
    summary = {
        "policy": description,
        "prompt_template": args.prompt_template,
        "system_prompt": args.system_prompt,
        "chat_template_kwargs": args.chat_template_kwargs,
        "sampling": _sampling_settings(args),
        "k_values": args.ks,
        "benchmarks": results,
    }
    report.write_reports(Path(args.output_dir), summary)
    for name, result in results.items():
        print(report.one_line(name, result))
    track_summary(args, summary)
    logger.info("eval finished in %.1f s; results in %s", time.monotonic() - started, args.output_dir)
    return summary


def tracked_metrics(summary: dict[str, Any]) -> dict[str, float | None]:
    """``<benchmark>/pass@k``, ``maj@k``, ``mean@n``, ``truncated``, ``answered`` for the trackers."""
    metrics: dict[str, float | None] = {}
    for name, result in summary["benchmarks"].items():
        for family in ("pass@k", "maj@k"):
            for k, value in result[family].items():
                metrics[f"{name}/{family[:-1]}{k}"] = value
        for key in ("mean@n", "truncated", "answered", "mean_completion_tokens"):
            metrics[f"{name}/{key}"] = result.get(key)
    return metrics


def track_summary(args: EvalArguments, summary: dict[str, Any]) -> None:
    """Send the summary numbers to ``args.report_to`` (nothing for none)."""
    from qalign.tracking import Tracker

    with Tracker(
        args.report_to, args.output_dir, "eval", {"policy": summary["policy"], **summary["sampling"]}
    ) as tracker:
        tracker.log(tracked_metrics(summary))
