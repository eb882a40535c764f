"""Run every method of a comparison, grade each on the same held-out problems, and keep what finished.

Per method, in ``output_dir/<method>/``:

    plan.json      what the budget made of its config (a restart with another plan is refused)
    train.yaml     the qalign.train config it ran (shared keys + its section + the planned size)
    train.log      the training run's output
    trained.json   marker: training finished (wall time); a restart skips training
    eval_greedy/   qalign.eval run folder (resumable sample by sample): greedy accuracy
    eval_sampled/  the same at the held-out temperature: mean@n
    kl.json        KL(π ‖ π_ref) per token on held-out prompts (see ``qalign.compare.kl``)
    result.json    marker: the method is done; a restart reads it and reruns nothing

Training runs as a child ``python -m qalign.train`` (a crash or kill in one method leaves the others'
results intact; a killed run resumes from its last checkpoint); evaluation runs here, through
``qalign.eval``'s resumable runner. The offline methods share one collection, ``output_dir/offline_data``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from qalign.checkpoints import latest_complete_checkpoint
from qalign.compare.config import (
    GUIDED,
    OFFLINE,
    ONLINE,
    CompareConfig,
    MethodPlan,
    collect_config,
    offline_data_dir,
    plan_method,
)
from qalign.config import ConfigError
from qalign.reporting import write_atomic

logger = logging.getLogger("qalign.compare")


# ----------------------------------------------------------------------------- markers and plans


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2, default=str) + "\n")


def check_plan(folder: Path, plan: MethodPlan) -> None:
    """Store the plan, or refuse to resume a folder that holds a different one (naming what differs)."""
    record = {"method": plan.method, "samples": plan.samples, "train_config": plan.train_config}
    stored = _read_json(folder / "plan.json")
    if stored is None:
        _write_json(folder / "plan.json", record)
        return
    if stored != record:
        old, new = stored.get("train_config") or {}, record["train_config"] or {}
        keys = sorted(k for k in {*old, *new} if old.get(k) != new.get(k)) or ["method/samples"]
        raise ConfigError(f"{folder} holds method {plan.name!r} run with other settings ({', '.join(keys)} "
                          f"differ); delete that folder to run it again, or use another output_dir")  # fmt: skip


# ----------------------------------------------------------------------------- child processes


def run_logged(command: list[str], log: Path, cwd: Path | None = None) -> float:
    """Run ``command``, its output both shown and appended to ``log``; returns the wall time in seconds.
    A failure raises with the log's tail, so the user sees why without opening the file."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as sink, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  cwd=cwd, env=env) as child:  # fmt: skip
        assert child.stdout is not None
        for chunk in iter(lambda: child.stdout.read1(4096), b""):
            sink.write(chunk)
            sink.flush()
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
    if child.returncode != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise RuntimeError(f"{' '.join(command[:4])} … {exit_reason(child.returncode)}; end of {log}:\n{tail}")
    return time.monotonic() - start


def exit_reason(returncode: int) -> str:
    """How a child ended, in words: a SIGKILL on Linux is most often the kernel's out-of-memory killer,
    which leaves nothing in the child's own log."""
    if returncode >= 0:
        return f"failed (exit {returncode})"
    name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
    hint = " (out of memory? run fewer methods at once, or check `dmesg`)" if returncode == -signal.SIGKILL else ""
    return f"was killed by {name}{hint}; finished methods are kept and a rerun resumes"


def collect_offline_data(config: CompareConfig) -> float:
    """π_ref's samples for the offline methods, once (``qalign.collect`` resumes a killed collection).

    Several ``--only`` runs on one output folder may start together: the first collects while the
    others wait on the lock, then find the marker and collect nothing.
    """
    marker = config.root / "offline_data.done.json"
    config.root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(config.root / "offline_data.lock")):
        if (done := _read_json(marker)) is not None:
            return float(done["seconds"])
        path = config.root / "offline_data.yaml"
        path.write_text(yaml.safe_dump(collect_config(config), sort_keys=False))
        seconds = run_logged(
            [sys.executable, "-m", "qalign.collect", "--config", str(path)], config.root / "offline_data.log"
        )
        _write_json(marker, {"seconds": seconds, "rows": config.budget})
    return seconds


def train_method(config: CompareConfig, plan: MethodPlan) -> float:
    """Train one method in a child process (resuming from its last checkpoint); returns wall seconds."""
    folder = config.root / plan.name
    marker = folder / "trained.json"
    if (done := _read_json(marker)) is not None:
        return float(done["seconds"] or 0.0)
    assert plan.train_config is not None
    model_dir = Path(plan.train_config["output_dir"])
    if (model_dir / ("results.json" if plan.method == "qprobe" else "trainer_state.json")).is_file():
        # Written last (qalign.train: after the final save; qalign.probe: the results): the run finished and
        # only the marker was lost to a kill. Resuming from its last checkpoint would train past the end
        # (transformers runs one more step).
        _write_json(marker, {"seconds": None})
        return 0.0
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(plan.train_config, sort_keys=False))
    command = [sys.executable, "-m", plan.entry, "--config", str(path)]
    checkpoint = latest_complete_checkpoint(model_dir)  # a checkpoint cut short by the kill is skipped
    # Q# and qprobe resume their own data; trainers resume from their last checkpoint.
    if checkpoint is not None and plan.entry == "qalign.train" and plan.method not in GUIDED:
        command += ["--resume_from_checkpoint", str(checkpoint)]
    seconds = run_logged(command, folder / "train.log")
    _write_json(marker, {"seconds": seconds})
    return seconds


# ----------------------------------------------------------------------------- evaluation


def heldout_data_file(config: CompareConfig) -> str | None:
    """The held-out problems' file: the benchmark's own (None: bundled or hub), or, for a validation split,
    the last ``heldout.problems`` problems of the training split, written once to ``validation.jsonl``.

    A validation problem whose question also appears among the problems the methods train on (the
    bundled task repeats its bare "What is a + b?" questions), or earlier in the validation set, is left
    out, so fewer than ``heldout.problems`` may remain; the report counts what was graded."""
    held, shared = config.heldout, config.shared
    if held.split == "test":
        return held.data_file
    path = config.root / "validation.jsonl"
    if not path.is_file():
        from qalign.data import load_math_split

        rows = load_math_split(shared.get("dataset_name", "arithmetic"), shared.get("dataset_train_split", "train"),
                               shared.get("dataset_config"), shared.get("question_column"),
                               shared.get("answer_column"))  # fmt: skip
        cut = len(rows) - held.problems
        seen = set(rows.select(range(cut))["question"])
        kept = []
        for row in rows.select(range(cut, len(rows))):
            if row["question"] not in seen:
                seen.add(row["question"])
                kept.append({"question": row["question"], "answer": row["answer"]})
        logger.info("validation split: %d of the last %d training problems (the rest repeat a training question)",
                    len(kept), held.problems)  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
    return str(path)


def eval_arguments(config: CompareConfig, output_dir: Path, model: str, greedy: bool):
    """The ``qalign.eval`` arguments of the held-out evaluation (greedy, or n samples at the held-out T)."""
    from qalign.eval.config import EvalArguments

    shared, held = config.shared, config.heldout
    n = 1 if greedy else held.n
    data_file = heldout_data_file(config)
    return EvalArguments(
        model_name_or_path=model,
        dtype=config.dtype,
        batch_size=held.batch_size,
        benchmarks=[held.benchmark],
        data_files={held.benchmark: data_file} if data_file else {},
        limit=held.problems,
        prompt_template=str(shared.get("prompt_template", "boxed")),
        system_prompt=shared.get("system_prompt"),
        chat_template_kwargs=shared.get("chat_template_kwargs"),
        n=n,
        temperature=0.0 if greedy else held.temperature,
        top_p=1.0 if greedy else held.top_p,
        max_tokens=config.max_tokens,
        seed=held.seed,
        problems_per_call=max(1, held.batch_size // n),
        fallback_last_number="accuracy_last_number" in (shared.get("reward_funcs") or []),
        output_dir=str(output_dir),
        rollout_backend=held.rollout_backend,
        show_progress=True,
    )


def policy_source(config: CompareConfig, plan: MethodPlan) -> str:
    """The folder (or id) the method's policy is loaded from."""
    if plan.train_config is None:
        return config.reference_model
    return str(plan.train_config["output_dir"])


def load_method_policy(config: CompareConfig, plan: MethodPlan, args):
    """A ``qalign.policies.Policy``: the guided π_ref for Q#/CD, the (trained) LM otherwise."""
    if plan.method in GUIDED:
        from qalign.decoding.guided import load_guided_policy

        return load_guided_policy(policy_source(config, plan), batch_size=args.batch_size, dtype=args.dtype,
                                  backend=args.rollout_backend, seed=args.seed)  # fmt: skip
    from qalign.eval.runner import load_policy

    return load_policy(args)


def problem_scores(run_dir: Path, benchmark: str) -> list[float]:
    """Per held-out problem, the fraction of its samples graded right, in problem order."""
    by_problem: dict[int, list[bool]] = {}
    for line in (run_dir / "samples" / f"{benchmark}.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_problem.setdefault(int(row["index"]), []).append(bool(row["correct"]))
    return [sum(v) / len(v) for _, v in sorted(by_problem.items())]


def evaluate_method(config: CompareConfig, plan: MethodPlan, greedy: bool, policy_getter: Callable) -> dict[str, Any]:
    """Greedy or sampled held-out evaluation of one method (resumes sample by sample)."""
    from qalign.eval.runner import run_eval

    folder = config.root / plan.name / ("eval_greedy" if greedy else "eval_sampled")
    args = eval_arguments(config, folder, policy_source(config, plan), greedy)
    summary = run_eval(args, policy_getter(args))
    result = summary["benchmarks"][config.heldout.benchmark]
    return {"scores": problem_scores(folder, config.heldout.benchmark), "truncated": result["truncated"],
            "answered": result["answered"], "mean_completion_tokens": result["mean_completion_tokens"]}  # fmt: skip


def measure_kl(config: CompareConfig, plan: MethodPlan, policy, ref_model) -> dict[str, float]:
    """KL(π ‖ π_ref) per token over one T = 1 completion of each of the first ``kl_problems`` prompts."""
    from qalign.compare.kl import completion_kl
    from qalign.data.prompts import render_prompt
    from qalign.eval.benchmarks import load_benchmark
    from qalign.rollout.base import SamplingConfig

    held = config.heldout
    count = min(held.kl_problems, held.problems)
    if plan.train_config is None or count == 0:
        return {"kl_per_token": 0.0, "tokens": 0.0, "prompts": float(count)}
    problems = load_benchmark(held.benchmark, heldout_data_file(config), count)
    tokenizer = policy.tokenizer
    template = str(config.shared.get("prompt_template", "boxed"))
    prompt_ids = [tokenizer(render_prompt(tokenizer, p.question, template, config.shared.get("system_prompt"),
                                          config.shared.get("chat_template_kwargs")),
                            add_special_tokens=False)["input_ids"] for p in problems]  # fmt: skip
    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=config.max_tokens, seed=held.seed)
    engine = policy.engine
    if plan.method in GUIDED:
        if not hasattr(engine, "kl_summary"):
            # vLLM's guided sampler reports no KL: the HF guided engine decodes the same policy and sums the
            # exact per-state KL as it goes, as it did for every guided row (π_ref: the one already loaded).
            from qalign.decoding.guided import load_guided_engine

            engine = load_guided_engine(policy_source(config, plan), dtype=config.dtype, reference_model=ref_model)[0]
        engine.reset_kl()
        engine.generate(prompt_ids, sampling)
        summary = engine.kl_summary()
        return {"kl_per_token": summary["kl_per_token"], "tokens": summary["tokens"], "prompts": float(count)}
    completions = [group[0] for group in engine.generate(prompt_ids, sampling)]
    # vLLM engines hold no torch module: the policy's log-probs then come from an HF copy of its weights.
    model = getattr(engine, "model", None)
    if model is None:
        from qalign.models import load_model

        model = load_model(policy_source(config, plan), config.dtype).eval()
    values = [kl for c in completions for kl in completion_kl(model, ref_model, c.prompt_ids, c.completion_ids)]
    return {"kl_per_token": sum(values) / max(len(values), 1), "tokens": float(len(values)), "prompts": float(count)}


def checkpoint_curve(config: CompareConfig, plan: MethodPlan) -> list[list[float]]:
    """(training samples, greedy held-out accuracy) at each intermediate checkpoint of an online method."""
    from qalign.eval.runner import run_eval

    if plan.method not in ONLINE or not config.curve_points:
        return []
    per_step = plan.samples // int(plan.train_config["max_steps"])
    points = []
    for checkpoint in sorted(
        Path(plan.train_config["output_dir"]).glob("checkpoint-*"), key=lambda p: int(p.name[11:])
    ):
        step = int(checkpoint.name[11:])
        folder = config.root / plan.name / f"eval_{checkpoint.name}"
        run_eval(eval_arguments(config, folder, str(checkpoint), greedy=True))
        scores = problem_scores(folder, config.heldout.benchmark)
        points.append([float(step * per_step), sum(scores) / len(scores)])
    return points


# ----------------------------------------------------------------------------- cost accounting


def training_samples(plan: MethodPlan) -> int:
    """Completions the method sampled for training: the plan's, or what dynamic sampling really drew
    (its running total, dropped groups included, in the trainer's log)."""
    if plan.method not in ONLINE:
        return plan.samples
    state = _read_json(Path(plan.train_config["output_dir"]) / "trainer_state.json") or {"log_history": []}
    totals = [e["dynamic_sampling/sampled_completions"] for e in state["log_history"]
              if "dynamic_sampling/sampled_completions" in e]  # fmt: skip
    return int(totals[-1]) if totals else plan.samples


def training_tokens(config: CompareConfig, plan: MethodPlan) -> int | None:
    """Completion tokens the method generated for training, read from what its run wrote."""
    if plan.train_config is None:
        return 0
    if plan.method in OFFLINE:
        from qalign.data.rollouts import load_rollouts

        return int(sum(len(ids) for ids in load_rollouts(str(offline_data_dir(config)), "train")["completion_ids"]))
    model_dir = Path(plan.train_config["output_dir"])
    if plan.method in ONLINE:
        state = _read_json(model_dir / "trainer_state.json")
        if state is None:
            return None
        per_step = plan.samples // int(plan.train_config["max_steps"])
        lengths = [e["completions/mean_length"] for e in state["log_history"] if "completions/mean_length" in e]
        return round(sum(lengths) * per_step)
    rows = [json.loads(line) for file in sorted((model_dir / "qsharp_data").glob("iter*.jsonl"))
            for line in file.read_text().splitlines()]  # fmt: skip
    # Each Q# row is one roll-in (``rollin_length`` tokens generated by the guided policy, or π_ref at the
    # first iteration) continued by π_ref's roll-out (``target_ids``).
    lengths = [r["rollin_length"] + len(r["target_ids"]) for r in rows if "target_ids" in r]
    return sum(lengths) if lengths else None


# Q#'s per-iteration value-model diagnostics (docs/qsharp.md, "Diagnostics"), as its trainer logs them.
VALUE_DIAGNOSTICS = ("heldout_value_loss", "constant_value_loss", "heldout_auroc", "heldout_kl_per_token",
                     "constant_value_kl_per_token", "heldout_rows")  # fmt: skip


def value_diagnostics(plan: MethodPlan) -> list[dict[str, Any]] | None:
    """For Q#/CD, each iteration's held-out value-model diagnostics from the trainer's log (empty when no prompt
    was held out); None for the other methods or before training finished."""
    if plan.method not in GUIDED or plan.train_config is None:
        return None
    state = _read_json(Path(plan.train_config["output_dir"]) / "trainer_state.json")
    if state is None:
        return None
    return [
        {"iteration": int(entry["qsharp/iteration"]), **{key: entry.get(f"qsharp/{key}") for key in VALUE_DIAGNOSTICS},
         "uninformative": bool(entry.get("qsharp/value_model_uninformative"))}
        for entry in state["log_history"] if "qsharp/heldout_value_loss" in entry
    ]  # fmt: skip


# ----------------------------------------------------------------------------- one method, all methods


def probe_result(config: CompareConfig, plan: MethodPlan, train_seconds: float) -> dict[str, Any]:
    """qprobe's row from its ``results.json``: best-of-k per held-out problem (``sampled``), best-of-1 beside
    it (the same samples taken one at a time: π_ref at the held-out temperature), no greedy decoding."""
    from qalign.compare.kl import best_of_k_kl_bound

    results = json.loads((Path(plan.train_config["output_dir"]) / "results.json").read_text())
    table = results["per_prompt"][str(plan.train_config["betas"][0])][plan.train_config["losses"][0]]
    k = plan.train_config["samples_per_prompt"]
    problems = len(table[str(k)])  # a validation split may hold fewer than heldout.problems
    return {
        "name": plan.name, "method": plan.method, "samples": plan.samples, "note": plan.note,
        "test_time_samples": k * problems, "training_tokens": None, "train_seconds": train_seconds,
        "eval_seconds": 0.0, "greedy": None, "curve": [],
        "sampled": {"scores": table[str(k)], "truncated": None, "answered": None, "mean_completion_tokens": None},
        "best_of_1": {"scores": table["1"]},
        "kl": {"kl_per_token": None, "kl_per_sequence_bound": best_of_k_kl_bound(k)},
        "config": str(config.root / plan.name / "train.yaml"),
    }  # fmt: skip


def run_method(config: CompareConfig, plan: MethodPlan) -> dict[str, Any]:
    """Train (unless finished), evaluate and measure one method; its ``result.json`` once done."""
    folder = config.root / plan.name
    if (done := finished_result(config, plan)) is not None:
        return done
    check_plan(folder, plan)
    if plan.method == "qprobe":
        heldout_data_file(config)  # the probe grades the same problems: a validation split's file must exist
    train_seconds = train_method(config, plan) if plan.train_config is not None else 0.0
    if plan.method == "qprobe":
        result = probe_result(config, plan, train_seconds)
        _write_json(folder / "result.json", result)
        return result
    start = time.monotonic()
    loaded: list[Any] = []

    def policy_getter(args):
        if not loaded:
            loaded.append(load_method_policy(config, plan, args))
        return loaded[0]

    try:
        greedy = evaluate_method(config, plan, True, policy_getter)
        sampled = evaluate_method(config, plan, False, policy_getter)
        kl = _read_json(folder / "kl.json")
        if kl is None:
            from qalign.models import load_model

            policy = policy_getter(eval_arguments(config, folder, policy_source(config, plan), True))
            ref = None
            if plan.train_config is not None and plan.method not in GUIDED:
                ref = load_model(config.reference_model, config.dtype).eval()
            kl = measure_kl(config, plan, policy, ref)
            _write_json(folder / "kl.json", kl)
    finally:
        for policy in loaded:
            policy.close()
    curve = checkpoint_curve(config, plan)  # after the policy is closed: one engine in memory at a time
    result = {
        "name": plan.name, "method": plan.method, "samples": training_samples(plan), "note": plan.note,
        "training_tokens": training_tokens(config, plan), "train_seconds": train_seconds,
        "eval_seconds": time.monotonic() - start, "greedy": greedy, "sampled": sampled, "kl": kl, "curve": curve,
        "config": str(folder / "train.yaml") if plan.train_config is not None else None,
        "value_diagnostics": value_diagnostics(plan),
    }  # fmt: skip
    _write_json(folder / "result.json", result)
    return result


def finished_result(config: CompareConfig, plan: MethodPlan) -> dict[str, Any] | None:
    """The method's ``result.json``, or None while it has not finished. A Q#/CD result written before the
    value-model diagnostics were recorded gets them from the trainer's log, which finished with it."""
    result = _read_json(config.root / plan.name / "result.json")
    if result is not None and "value_diagnostics" not in result:
        result["value_diagnostics"] = value_diagnostics(plan)
    return result


def one_line(result: dict[str, Any]) -> str:
    mean = lambda scores: f"{sum(scores) / len(scores):.3f}"
    greedy = mean(result["greedy"]["scores"]) if result["greedy"] else "n/a"
    kl = result["kl"]["kl_per_token"]
    kl_text = f"{kl:.4f}" if kl is not None else f"<= {result['kl']['kl_per_sequence_bound']:.3f}/sequence"
    return (f"{result['name']}: greedy {greedy}  mean@n {mean(result['sampled']['scores'])}  KL/token {kl_text}  "
            f"samples {result['samples']}  train {result['train_seconds']:.0f} s")  # fmt: skip


def resolve_heldout_backend(config: CompareConfig) -> None:
    """``heldout.rollout_backend: auto`` → one engine for every LM policy of the comparison
    (``qalign.rollout.backend``): the engine of held-out samples already written under ``output_dir``,
    else vllm where it can run, else hf. The report's ``heldout`` records it."""
    from qalign.rollout.backend import AUTO, recorded_backend, resolve_backend

    held = config.heldout
    if held.rollout_backend == AUTO:
        stores = sorted(config.root.glob("*/eval_*/samples/*.meta.json"))
        recorded = recorded_backend(stores, lambda meta: meta["policy"]["backend"])
        held.rollout_backend = resolve_backend(AUTO, recorded=recorded, key="heldout.rollout_backend")


def run_compare(config: CompareConfig) -> dict[str, Any]:
    """Every method in order; then the report (``qalign.compare.report``). Returns the report record."""
    from tqdm.auto import tqdm

    from qalign.compare.report import write_report

    config.root.mkdir(parents=True, exist_ok=True)
    # shared.env holds for the whole comparison: its own evaluation engines (vLLM's KV-cache size, the thread
    # count) and every child it starts (collection, probes), not only the qalign.train runs that read it.
    for name, value in (config.shared.get("env") or {}).items():
        os.environ[str(name)] = str(value)
    if "OMP_NUM_THREADS" in os.environ:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    resolve_heldout_backend(config)
    plans = [plan_method(config, name) for name in config.methods]
    to_run = [plan for plan in plans if not config.only or plan.name in config.only]
    offline_seconds = None
    if any(plan.method in OFFLINE for plan in to_run):
        offline_seconds = collect_offline_data(config)
    elif (done := _read_json(config.root / "offline_data.done.json")) is not None:
        offline_seconds = float(done["seconds"])
    results = {}
    for plan in tqdm(to_run, desc="compare", unit="method"):
        results[plan.name] = run_method(config, plan)
        print(f"qalign compare: {one_line(results[plan.name])}", flush=True)
    # Methods left out by ``only`` are reported when an earlier or a parallel run finished them.
    for plan in plans:
        if plan.name not in results and (done := finished_result(config, plan)) is not None:
            results[plan.name] = done
    reported = [plan for plan in plans if plan.name in results]
    record = write_report(config, reported, results, offline_seconds)
    track_report(config, record)
    return record


def tracked_metrics(record: dict[str, Any]) -> dict[str, float | None]:
    """``<method>/<greedy|sampled>_accuracy``, ``…_truncated`` and ``<method>/kl_per_token`` per report row."""
    metrics: dict[str, float | None] = {}
    for row in record["rows"]:
        for mode in ("greedy", "sampled"):
            if row[mode] is not None:
                metrics[f"{row['name']}/{mode}_accuracy"] = row[mode]["estimate"]
                metrics[f"{row['name']}/{mode}_truncated"] = row[mode]["truncated"]
        metrics[f"{row['name']}/kl_per_token"] = row["kl_per_token"]
    return metrics


def track_report(config: CompareConfig, record: dict[str, Any]) -> None:
    """Send the report's numbers to ``config.report_to`` (nothing for none)."""
    from qalign.tracking import Tracker

    with Tracker(config.report_to, config.output_dir, "compare", {"budget": config.budget}) as tracker:
        tracker.log(tracked_metrics(record))
