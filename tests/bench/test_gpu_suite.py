"""bench/gpu_suite.sh: the CPU smoke runs every measurement's code path end to end (slow), and the plan, the
commands and the report hold what the GPU run needs (fast, no measurement runs)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.needs import require

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_suite.sh"


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


suite = load_suite()
report = importlib.import_module("gpu_suite_render")  # the driver put bench/ on sys.path to import it
NAMES = [step.name for step in suite.STEPS]
HEADINGS = ["### Training throughput", "### GRPO step time", "### One-GPU ZeRO", "### Q# guided decoding", "### Runs"]


def has_async_rollouts() -> bool:
    from qalign.rollout.config import RolloutArguments

    return suite.ASYNC_FIELD in {field.name for field in dataclasses.fields(RolloutArguments)}


def test_the_gpu_plan_fits_eight_minutes_with_the_install():
    assert suite.INSTALL_BUDGET_S + sum(step.gpu_s for step in suite.STEPS) == suite.PLAN_SECONDS < 8 * 60
    assert NAMES == ["model", "throughput_offline", "throughput_grpo", "grpo_hf", "grpo_vllm", "grpo_vllm_async",
                     "guided", "zero2", "zero3", "zero3_offload"]  # fmt: skip
    assert all(step.gpu_s >= suite.MIN_STEP_S and step.smoke_s > 0 for step in suite.STEPS)


def test_commands_on_the_gpu_and_in_the_smoke(tmp_path):
    for smoke, shapes in ((False, suite.GPU_SHAPES), (True, suite.SMOKE_SHAPES)):
        ctx = {"python": sys.executable, "shapes": shapes, "work": tmp_path, "smoke": smoke, "existing_model": None,
               "tokenizer": "", "model": str(tmp_path / "model")}  # fmt: skip
        commands = {name: suite.command(name, ctx) for name in NAMES}
        assert commands["grpo_vllm_async"][-2:] == ["--async-steps", "1"]
        assert "--async-steps" not in commands["grpo_vllm"]
        assert ("--require-cuda" in commands["model"]) is not smoke
        for name in ("zero2", "zero3", "zero3_offload"):
            command = commands[name]
            config = Path(command[command.index("--config_file") + 1])
            assert config == REPO / "configs" / "accelerate" / f"{name}.yaml" and config.is_file()
            assert command[command.index("--num_processes") + 1] == "1"
            assert command[command.index("--mixed_precision") + 1] == ("no" if smoke else "bf16")
            assert command[command.index("--trainers") + 1] == "dqo"
        dtype = commands["throughput_offline"][commands["throughput_offline"].index("--dtype") + 1]
        assert dtype == ("float32" if smoke else "bfloat16")


def result_of(name: str) -> dict:
    """A plausible result of each measurement, as its benchmark writes it."""
    trainer = {"step_seconds": 0.5, "tokens_per_second": 1000.0, "mfu": 0.1, "peak_memory_gib": 3.0}
    grpo = {"setup_seconds": 9.0, "step_seconds": [9.0, 5.0, 5.2], "steady_step_seconds": 5.1,
            "steady_generate_seconds": 4.0, "steady_sync_seconds": 0.07, "sync_share_of_step": 0.014,
            "peak_memory_gib": 20.0}  # fmt: skip
    if name == "model":
        return {"cuda": True, "device": "NVIDIA H200", "device_memory_mib": 143771, "compute_capability": "9.0",
                "driver": "580", "cpu_cores": 16, "python": "3.12.3", "software": {"torch": "2.11.0"},
                "async_rollouts": True, "model": {"path": "/tmp/m", "parameters": 494_032_768, "tokenizer": "tok"}}  # fmt: skip
    if name == "throughput_offline":
        return {t: dict(trainer) for t in ("sft", "shiq", "dqo")}
    if name == "throughput_grpo":
        return {t: dict(trainer) for t in ("trl_grpo", "grpo")}
    if name.startswith("zero"):
        return {"dqo": dict(trainer, step_seconds=0.6)}
    if name == "guided":
        engine = {"wall_seconds_per_step": 0.02, "cpu_seconds_per_step": 0.02, "steps": 32}
        return {"engines": {"unguided": engine, "guided": dict(engine, wall_seconds_per_step=0.03)}}
    return dict(grpo)


def test_the_report_has_every_section_and_says_what_was_not_measured():
    measurements = {name: {"status": "ok", "seconds": 1.0, "budget_seconds": 30, "result": result_of(name),
                           "summary": report.check(name, result_of(name))} for name in NAMES}  # fmt: skip
    measurements["zero3_offload"] = {"status": "timeout", "budget_seconds": 40, "reason": "killed after 40 s: hung"}
    results = {"suite": {"mode": "gpu", "date": "2026-12-03 10:00 UTC", "command": "bash bench/gpu_suite.sh",
                         "plan_seconds": 470, "install_seconds": 40.0, "total_seconds": 400.0,
                         "environment": result_of("model")}, "measurements": measurements}  # fmt: skip
    text = report.render(results, suite.GPU_SHAPES)
    assert text.startswith("## GPU suite, 2026-12-03 10:00 UTC (NVIDIA H200)")
    assert all(heading in text for heading in HEADINGS)
    assert "| vllm + async (`async_steps` 1) | 9.0 |" in text
    assert "| grpo | 0.500 | 1,000 | 10.0% | 3.0 | 1.000× TRL GRPO tokens/s (goal ≥ 0.98) |" in text
    assert "| zero3_offload | not measured: killed after 40 s: hung |" in text
    assert "**Guided-decoding ratio: 1.50×**" in text

    measurements["grpo_vllm_async"] = {"status": "skipped", "reason": suite.NOT_ASYNC}
    assert "| vllm + async (`async_steps` 1) | not measured: asynchronous rollouts are not implemented yet" in (
        report.render(results, suite.GPU_SHAPES)
    )


def test_the_smoke_never_writes_under_docs(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--out", "docs/smoke.md"], capture_output=True,
                            text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert result.returncode == 2 and "never writes under docs/" in result.stderr
    assert not (REPO / "docs" / "smoke.md").exists()


@pytest.mark.slow
@pytest.mark.vllm
def test_cpu_smoke_runs_every_measurement_end_to_end(tmp_path):
    """`bash bench/gpu_suite.sh --cpu-smoke` (about 3 min here): every measurement has numbers, or a stated
    reason why it cannot run on a CPU; the markdown has each section; docs/ is left alone."""
    require("vllm")
    require("deepspeed")
    docs = (REPO / "docs" / "gpu_results.md").read_text()
    out = tmp_path / "smoke.md"
    result = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--out", str(out)], capture_output=True, text=True,
                            timeout=1500, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    measurements = results["measurements"]
    assert list(measurements) == NAMES
    assert results["suite"]["mode"] == "cpu-smoke" and results["suite"]["environment"]["software"]["torch"]

    def ok(name: str) -> dict:
        assert measurements[name]["status"] == "ok", measurements[name]
        assert measurements[name]["seconds"] > 0
        return measurements[name]["result"]

    assert ok("model")["model"]["parameters"] > 0
    for name, trainers in (("throughput_offline", ["sft", "shiq", "dqo"]), ("throughput_grpo", ["trl_grpo", "grpo"]),
                           ("zero2", ["dqo"]), ("zero3", ["dqo"])):  # fmt: skip
        rows = ok(name)
        assert list(rows) == trainers
        for row in rows.values():
            assert row["step_seconds"] > 0 and row["tokens_per_second"] > 0 and row["mfu"] > 0  # nominal 1 TFLOP/s
    for name in ("grpo_hf", "grpo_vllm"):
        run = ok(name)
        assert run["steady_step_seconds"] > 0 and run["steady_generate_seconds"] > 0
    assert ok("grpo_vllm")["steady_sync_seconds"] > 0  # 3 steps: synced at steps 2 and 3
    engines = ok("guided")["engines"]
    assert engines["guided"]["wall_seconds_per_step"] > 0 and engines["unguided"]["wall_seconds_per_step"] > 0
    if has_async_rollouts():
        assert ok("grpo_vllm_async")["async_steps"] == 1
    else:
        assert measurements["grpo_vllm_async"] == {"status": "skipped", "budget_seconds": 300,
                                                   "reason": suite.NOT_ASYNC}  # fmt: skip
    assert measurements["zero3_offload"]["status"] == "skipped"
    assert "--cpu-smoke" in measurements["zero3_offload"]["reason"]

    markdown = out.read_text()
    assert markdown.startswith("## GPU suite: CPU smoke, ") and "CPU smoke (" in markdown
    assert all(heading in markdown for heading in HEADINGS)
    assert markdown == (tmp_path / "section.md").read_text()
    for name in NAMES:
        assert f"\n| {name} | {measurements[name]['status']} |" in markdown
        assert f"] {name} " in result.stdout  # one line per measurement
    assert "\ntotal " in result.stdout
    assert (REPO / "docs" / "gpu_results.md").read_text() == docs
