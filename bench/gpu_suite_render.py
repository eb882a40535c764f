"""The GPU suite's results as text: each measurement's one-line summary (which also checks that its benchmark
wrote the numbers it should) and the dated markdown section appended to docs/gpu_results.md. Nothing here runs
or measures; ``bench/gpu_suite.py``, the driver, passes in the results and the shapes they were measured at.
"""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpu_suite import Shapes


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell, with thousands separators; "–" where there is none."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def check(name: str, result) -> str:
    """The one-line summary of a result; raises when the result lacks its numbers."""
    if name == "model":
        return (f"{result.get('device', 'cpu')}; model {result['model']['parameters'] / 1e6:.1f}M parameters; "
                f"async rollouts {'present' if result['async_rollouts'] else 'absent'}")  # fmt: skip
    if name.startswith("throughput") or name.startswith("zero"):
        parts = []
        for trainer, r in result.items():
            assert float(r["step_seconds"]) > 0 and float(r["tokens_per_second"]) > 0, trainer
            parts.append(f"{trainer} {r['step_seconds']:.3f} s/step {r['tokens_per_second']:,.0f} tok/s")
        return "; ".join(parts)
    if name.startswith("grpo_"):
        assert float(result["steady_step_seconds"]) > 0 and float(result["steady_generate_seconds"]) > 0
        return (
            f"steady step {result['steady_step_seconds']:.3f} s, generation {result['steady_generate_seconds']:.3f} s"
        )
    if name == "guided":
        engines = result["engines"]
        ratio = engines["guided"]["wall_seconds_per_step"] / engines["unguided"]["wall_seconds_per_step"]
        return f"guided / unguided {ratio:.2f}x wall per step"
    raise ValueError(name)


def not_measured(entry: dict) -> str:
    """The table cell of a measurement that has no numbers: why not."""
    reason = entry.get("reason") or entry["status"]
    return reason if reason.startswith("not measured") else f"not measured: {reason}"


def device_line(suite: dict) -> str:
    """The report's device: the GPU, its memory and driver, or the CPU smoke's disclaimer."""
    info = suite.get("environment") or {}
    cores = info.get("cpu_cores") or os.cpu_count()
    if suite["mode"] == "cpu-smoke":
        return f"CPU smoke ({cores} cores): tiny shapes, few steps; the numbers only show that every code path runs"
    if not info.get("device"):
        return f"unknown (the model step failed), {cores} CPU cores"
    return (f"{info.get('device_count', 1)}× {info['device']} ({info['device_memory_mib']:,} MiB, compute capability "
            f"{info['compute_capability']}, driver {info.get('driver') or '?'}), {cores} CPU cores")  # fmt: skip


def render(results: dict, shapes: Shapes) -> str:
    """The markdown section of one run: ``results`` as results.json holds them, ``shapes`` the ones it ran."""
    suite, steps = results["suite"], results["measurements"]
    info = suite.get("environment") or {}
    title = "GPU suite: CPU smoke" if suite["mode"] == "cpu-smoke" else "GPU suite"
    lines = [f"## {title}, {suite['date']} ({info.get('device') or 'CPU'})", ""]
    software = ", ".join(f"{k} {v}" for k, v in (info.get("software") or {}).items())
    if info.get("torch_cuda"):
        software += f" (CUDA {info['torch_cuda']})"
    model = info.get("model") or {}
    lines += [
        f"- **Date:** {suite['date']}",
        f"- **Device:** {device_line(suite)}",
        f"- **Software:** Python {info.get('python', platform.python_version())}, {software or 'unknown'}",
        f"- **Model:** random-init Qwen2, `bench/grpo_step.py make-model --preset {shapes.preset}`, "
        f"{fmt((model.get('parameters') or 0) / 1e6, 1)}M parameters, {shapes.dtype}; tokenizer: "
        f"{model.get('tokenizer') or model.get('path', '?')}",
        f"- **Command:** `{suite['command']}`; install {suite['install_seconds']:.0f} s, total {suite['total_seconds']:.0f} s "
        f"of a {suite['plan_seconds']} s plan",
        "",
    ]  # fmt: skip

    # Training throughput
    off, grpo = shapes.offline, shapes.grpo_throughput
    peak = "a nominal 1 TFLOP/s peak" if shapes.peak_tflops else "the device's dense bf16 peak"
    lines += ["### Training throughput (`bench/train_throughput.py`)", "",
              f"Offline trainers: {off['batch']} sequences × ({off['prompt_length']} + {off['completion_length']}) "
              f"tokens per step, {off['steps']} steps. GRPO: {grpo['batch']} completions ({grpo['batch'] // grpo['num_generations']} "
              f"prompts × {grpo['num_generations']}) × ({grpo['prompt_length']} + {grpo['completion_length']}) tokens "
              f"per step with HF generation, {grpo['steps']} steps. Step time is the median after the first step; "
              f"MFU = 6·N·tokens/s over {peak}.", "",
              "| trainer | step s | tokens/s | MFU | peak GiB | vs |", "| --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    rows = {}
    for name in ("throughput_offline", "throughput_grpo"):
        entry = steps.get(name, {"status": "not run"})
        if entry["status"] == "ok":
            rows.update(entry["result"])
        else:
            lines.append(f"| {'sft, shiq, dqo' if name.endswith('offline') else 'trl_grpo, grpo'} | "
                         f"{not_measured(entry)} | | | | |")  # fmt: skip
    baseline = {"shiq": "sft", "dqo": "sft", "grpo": "trl_grpo"}
    for trainer, r in rows.items():
        base = rows.get(baseline.get(trainer, ""))
        versus = ""
        if base and trainer == "grpo":
            versus = f"{r['tokens_per_second'] / base['tokens_per_second']:.3f}× TRL GRPO tokens/s (goal ≥ 0.98)"
        elif base:
            versus = f"{r['step_seconds'] / base['step_seconds']:.2f}× an SFT step (goal ≤ 1.5)"
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {trainer} | {r['step_seconds']:.3f} | {r['tokens_per_second']:,.0f} | {mfu} | "
                     f"{fmt(r.get('peak_memory_gib'), 1)} | {versus} |")  # fmt: skip
    lines.append("")

    # GRPO step time
    g = shapes.grpo_step
    lines += ["### GRPO step time (`bench/grpo_step.py run`)", "",
              f"{g['batch']} completions per step ({g['batch'] // g['num_generations']} prompts × {g['num_generations']}), "
              f"≤ {g['max_completion_length']} new tokens, gradient accumulation {g['grad_accum']}, lr 1e-6, digit-fraction "
              f"reward; vLLM in-process, eager, `gpu_memory_utilization` 0.3, `sync_every` 1. HF runs "
              f"{g['hf_steps']} steps, vLLM {g['vllm_steps']}; *steady* is the median of steps 2 and later.", "",
              "| backend | setup s | step times s | steady step s | steady generation s | steady sync s (share) | "
              "peak GiB | HF step / this |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    hf = steps.get("grpo_hf", {})
    hf_step = hf.get("result", {}).get("steady_step_seconds") if hf.get("status") == "ok" else None
    for name, label in (
        ("grpo_hf", "hf"),
        ("grpo_vllm", "vllm"),
        ("grpo_vllm_async", "vllm + async (`async_steps` 1)"),
    ):
        entry = steps.get(name, {"status": "not run"})
        if entry["status"] != "ok":
            lines.append(f"| {label} | {not_measured(entry)} | | | | | | |")
            continue
        r = entry["result"]
        sync = "–"
        if r.get("steady_sync_seconds") is not None:
            sync = f"{r['steady_sync_seconds']:.3f} ({100 * r['sync_share_of_step']:.1f}%)"
        ratio = f"{hf_step / r['steady_step_seconds']:.2f}×" if hf_step else "–"
        times = ", ".join(f"{s:.2f}" for s in r["step_seconds"])
        lines.append(f"| {label} | {r['setup_seconds']:.1f} | {times} | **{r['steady_step_seconds']:.3f}** | "
                     f"{r['steady_generate_seconds']:.3f} | {sync} | {fmt(r.get('peak_memory_gib'), 1)} | {ratio} |")  # fmt: skip
    lines.append("")

    # ZeRO
    precision = "fp32 (CPU)" if suite["mode"] == "cpu-smoke" else "bf16"
    lines += ["### One-GPU ZeRO (`configs/accelerate/zero*.yaml`)", "",
              f"`accelerate launch --config_file configs/accelerate/<strategy>.yaml --num_processes 1 --mixed_precision "
              f"{'no' if suite['mode'] == 'cpu-smoke' else 'bf16'} bench/train_throughput.py --trainers dqo` at the offline "
              f"shape above, {precision}; *none* is the DQO row of the throughput table (no DeepSpeed).", "",
              "| strategy | step s | tokens/s | MFU | peak GiB | step vs none |", "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    plain = rows.get("dqo")
    if plain:
        mfu = "n/a" if plain.get("mfu") is None else f"{100 * plain['mfu']:.1f}%"
        lines.append(f"| none | {plain['step_seconds']:.3f} | {plain['tokens_per_second']:,.0f} | {mfu} | "
                     f"{fmt(plain.get('peak_memory_gib'), 1)} | 1.00× |")  # fmt: skip
    for name in ("zero2", "zero3", "zero3_offload"):
        entry = steps.get(name, {"status": "not run"})
        if entry["status"] != "ok":
            lines.append(f"| {name} | {not_measured(entry)} | | | | |")
            continue
        r = entry["result"]["dqo"]
        versus = f"{r['step_seconds'] / plain['step_seconds']:.2f}×" if plain else "–"
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {name} | {r['step_seconds']:.3f} | {r['tokens_per_second']:,.0f} | {mfu} | "
                     f"{fmt(r.get('peak_memory_gib'), 1)} | {versus} |")  # fmt: skip
    if suite["mode"] == "cpu-smoke":
        lines += ["", "(CPU smoke: DeepSpeed's shared-memory collective, unused by one process, is not built.)"]
    lines.append("")

    # Q# guided decoding
    q = shapes.guided
    lines += ["### Q# guided decoding (`bench/guided_decoding.py`)", "",
              f"π_ref = the model above ({shapes.guided_dtype}); value model = its first {q['value_layers']} layers + "
              f"a V head (float32); top-k {q['top_k']}, η 0.1, greedy; {q['num_prompts']} prompts × {q['max_tokens']} "
              f"tokens in one batch; medians of {q['repeats']} alternating repeats.", ""]  # fmt: skip
    entry = steps.get("guided", {"status": "not run"})
    if entry["status"] != "ok":
        lines.append(not_measured(entry))
    else:
        engines = entry["result"]["engines"]
        base = engines["unguided"]
        lines += ["| engine | ms/step wall | ms/step CPU | steps | ratio (wall) | ratio (CPU) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for engine, e in engines.items():
            lines.append(f"| {engine} | {1000 * e['wall_seconds_per_step']:.2f} | {1000 * e['cpu_seconds_per_step']:.2f} | "
                         f"{e['steps']} | {e['wall_seconds_per_step'] / base['wall_seconds_per_step']:.2f}× | "
                         f"{e['cpu_seconds_per_step'] / base['cpu_seconds_per_step']:.2f}× |")  # fmt: skip
        ratio = engines["guided"]["wall_seconds_per_step"] / base["wall_seconds_per_step"]
        lines += ["", f"**Guided-decoding ratio: {ratio:.2f}×** π_ref's time per step (wall)."]
    lines.append("")

    # Runs
    lines += [
        "### Runs",
        "",
        "| measurement | status | seconds | budget s | summary |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for name, entry in steps.items():
        summary = entry.get("summary") or entry.get("reason") or ""
        lines.append(f"| {name} | {entry['status']} | {fmt(entry.get('seconds'), 1)} | "
                     f"{fmt(entry.get('budget_seconds'), 0)} | {summary.replace('|', '/')} |")  # fmt: skip
    lines.append("")
    return "\n".join(lines)
