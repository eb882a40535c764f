"""``qalign.compare`` end to end on the tiny model: three methods, the report, and resume after kills."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.tensorboard_events import read_scalars

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def compare_yaml(tmp_path: Path, model: Path) -> Path:
    config = {
        "output_dir": str(tmp_path / "out"),
        "budget": 32,
        "shared": {"model_name_or_path": str(model), "dataset_name": "arithmetic", "prompt_template": "plain",
                   "reward_funcs": ["tests.compare.rewards:digit_share_slowly"], "max_completion_length": 8, "seed": 0,
                   "report_to": "none", "learning_rate": 1.0e-3, "lr_scheduler_type": "constant",
                   "rollout_backend": "hf"},  # HF generate throughout (auto would pick vLLM where installed)
        "heldout": {"problems": 6, "n": 2, "temperature": 1.0, "batch_size": 6, "kl_problems": 3,
                    "rollout_backend": "hf"},
        "offline": {"num_samples": 2, "temperature": 1.0},
        "curve_points": 1,
        "report_to": ["tensorboard"],
        "methods": {
            "reference": {},
            "grpo": {"per_device_train_batch_size": 8, "num_generations": 2, "temperature": 1.0, "beta": 0.0},
            "shiq": {"per_device_train_batch_size": 8, "num_train_epochs": 1, "max_prompt_length": None},
            "qsharp": {"num_iterations": 2, "num_samples_per_prompt": 2, "value_num_layers": 1,
                       "per_device_train_batch_size": 8},
            "qprobe": {"samples_per_prompt": 4, "loss": "pg", "probe": {"epochs": 20}},
        },
    }  # fmt: skip
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # methods run in the order written
    return path


def run(path: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "qalign.compare", "--config", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)  # fmt: skip


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]
    return output


def without_timings(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    for key in ("wall_seconds", "date"):
        report.pop(key)
    for row in report["rows"]:
        row.pop("eval_seconds")
    return report


def test_killed_inside_a_method_resumed_then_rerun_reruns_nothing(tiny_model_dir, tmp_path):
    """Three methods end to end. The first run is killed (with its training child) inside GRPO, after the
    reference finished; the second resumes GRPO from its checkpoint and finishes; the third reruns nothing."""
    path = compare_yaml(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    process = run(path, start_new_session=True)
    deadline = time.monotonic() + 600
    checkpoint = out / "grpo" / "model" / "checkpoint-2"
    while not (checkpoint / "trainer_state.json").is_file():
        assert process.poll() is None and time.monotonic() < deadline, "grpo never wrote its first checkpoint"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (out / "reference" / "result.json").is_file() and not (out / "grpo" / "trained.json").exists()
    reference_rows = (out / "reference" / "eval_greedy" / "samples" / "arithmetic.jsonl").read_text()
    checkpoint_written = (checkpoint / "trainer_state.json").stat().st_mtime

    output = finish(run(path))
    for name in ("reference", "grpo", "shiq", "qsharp", "qprobe"):
        assert f"qalign compare: {name}: greedy" in output  # one summary line per method
    # Nothing that finished was redone: the reference's samples, GRPO's first two steps.
    assert (out / "reference" / "eval_greedy" / "samples" / "arithmetic.jsonl").read_text() == reference_rows
    assert (checkpoint / "trainer_state.json").stat().st_mtime == checkpoint_written
    state = json.loads((out / "grpo" / "model" / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # 32 completions / 8 per step, two of them before the kill
    # Offline training checkpoints too (every quarter of its 4 steps), keeping the newest, so a kill resumes it.
    assert [p.name for p in (out / "shiq" / "model").glob("checkpoint-*")] == ["checkpoint-4"]

    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["reference", "grpo", "shiq", "qsharp", "qprobe"]
    # Best-of-4 with a probe trained on 8 prompts x 4 samples; 4 more samples per held-out problem at test time.
    assert rows["qprobe"]["greedy"] is None and rows["qprobe"]["samples"] == 32
    assert rows["qprobe"]["test_time_samples"] == 24 and rows["qprobe"]["kl_per_sequence_bound"] == pytest.approx(
        math.log(4) - 3 / 4
    )
    assert rows["qprobe"]["gain_over_best_of_1"]["problems"] == 6
    assert rows["reference"]["samples"] == 0
    # Each row keeps the per-problem scores and the training seed, so the report alone pools over seeds.
    grpo_result = json.loads((out / "grpo" / "result.json").read_text())
    assert (
        rows["grpo"]["sampled"]["scores"] == grpo_result["sampled"]["scores"]
        and len(grpo_result["sampled"]["scores"]) == 6
    )
    assert rows["grpo"]["seed"] == 0 and rows["reference"]["seed"] is None
    # Q#'s value-model diagnostics come from its trainer's log, one entry per iteration with held-out roll-outs.
    assert rows["grpo"]["value_diagnostics"] is None
    assert {d["iteration"] for d in rows["qsharp"]["value_diagnostics"]} <= {1, 2}
    assert rows["grpo"]["samples"] == rows["shiq"]["samples"] == rows["qsharp"]["samples"] == 32
    assert rows["reference"]["kl_per_token"] == 0.0
    # Each moved away from π_ref (Q#: the guided policy, measured on the states it visits).
    assert all(rows[name]["kl_per_token"] > 0 for name in ("grpo", "shiq", "qsharp"))
    assert 0 < rows["grpo"]["training_tokens"] <= 32 * 8 and 0 < rows["shiq"]["training_tokens"] <= 32 * 8
    # Q#'s 2 iterations x 8 prompts x 2 roll-ins: the guided policy's, the first from π_ref
    assert len((out / "qsharp" / "model" / "guided_policy.json").read_text()) > 0
    assert 0 < rows["qsharp"]["training_tokens"] <= 32 * 2 * 8  # each roll-in and roll-out at most 8 tokens
    # Every method was graded on the same 6 held-out problems, greedy and n = 2.
    for name in ("reference", "grpo", "shiq", "qsharp"):
        for mode, n in (("greedy", 1), ("sampled", 2)):
            lines = (out / name / f"eval_{mode}" / "samples" / "arithmetic.jsonl").read_text().splitlines()
            assert sorted((json.loads(line)["index"], json.loads(line)["sample"]) for line in lines) == [
                (i, s) for i in range(6) for s in range(n)
            ]
    assert set(report["comparisons"]) == {"reference", "grpo"}
    assert set(report["comparisons"]["reference"]) == {"grpo", "shiq", "qsharp", "qprobe"}
    assert report["comparisons"]["reference"]["qprobe"]["greedy"] is None
    assert report["comparisons"]["grpo"]["reference"]["greedy"]["problems"] == 6
    # GRPO's intermediate checkpoints (curve_points: 1 → every 2 steps) were evaluated for the curve.
    assert [point[0] for point in json.loads((out / "grpo" / "result.json").read_text())["curve"]] == [16.0, 32.0]
    for name in ("report.md", "frontier.png", "curves.png"):
        assert (out / name).stat().st_size > 0
    assert "| grpo |" in (out / "report.md").read_text()
    # TensorBoard got the report's numbers, equal to report.json's.
    scalars = read_scalars(out / "runs")
    assert scalars["grpo/greedy_accuracy"][-1] == (0, pytest.approx(rows["grpo"]["greedy"]["estimate"]))
    assert scalars["qsharp/kl_per_token"][-1] == (0, pytest.approx(rows["qsharp"]["kl_per_token"]))
    assert "qprobe/greedy_accuracy" not in scalars and "qprobe/sampled_accuracy" in scalars

    logs = {name: (out / name / "train.log").stat().st_mtime for name in ("grpo", "shiq")}
    samples = (out / "grpo" / "eval_sampled" / "samples" / "arithmetic.jsonl").read_text()
    finish(run(path))
    assert {name: (out / name / "train.log").stat().st_mtime for name in logs} == logs
    assert (out / "grpo" / "eval_sampled" / "samples" / "arithmetic.jsonl").read_text() == samples
    assert without_timings(json.loads((out / "report.json").read_text())) == without_timings(report)


def test_qprobe_on_a_validation_split_grades_the_problems_every_method_grades(tiny_model_dir, tmp_path):
    """Recipes are chosen on a validation split carved from train: Q-probe's best-of-k is computed on the same
    problems, in the same order, as the other methods' accuracy, so the two pair problem by problem."""
    path = compare_yaml(tmp_path, tiny_model_dir)
    config = yaml.safe_load(path.read_text())
    config["heldout"] |= {"split": "validation", "problems": 12}
    config["methods"] = {name: config["methods"][name] for name in ("reference", "qprobe")}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    finish(run(path))
    out = tmp_path / "out"
    validation = [json.loads(line)["question"] for line in (out / "validation.jsonl").read_text().splitlines()]
    graded = [json.loads(line) for line in (out / "reference" / "eval_greedy" / "samples" / "arithmetic.jsonl")
              .read_text().splitlines()]  # fmt: skip
    probed = [json.loads(line) for line in (out / "qprobe" / "model" / "samples_test.jsonl").read_text().splitlines()]
    assert 0 < len(validation) <= 12
    assert [row["question"] for row in probed if row["sample_index"] == 0] == validation
    assert [row["question"] for row in sorted(graded, key=lambda row: row["index"])] == validation
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["qprobe"]["test_time_samples"] == 4 * len(validation)
    assert report["comparisons"]["reference"]["qprobe"]["sampled"]["problems"] == len(validation)


def test_a_child_killed_by_sigkill_is_named_with_the_likely_cause(tmp_path):
    from qalign.compare.runner import exit_reason, run_logged

    assert exit_reason(1) == "failed (exit 1)"
    with pytest.raises(RuntimeError, match=r"killed by SIGKILL \(out of memory\?") as caught:
        run_logged([sys.executable, "-c", "import os, signal; print('started'); os.kill(os.getpid(), signal.SIGKILL)"],
                   tmp_path / "child.log")  # fmt: skip
    assert "started" in str(caught.value)  # the log's tail comes with it


def test_parallel_runs_wait_for_one_offline_collection(tiny_model_dir, tmp_path):
    """A second ``--only`` run that starts while the first is collecting waits for it and collects nothing."""
    import threading

    from filelock import FileLock

    from qalign.compare.config import load_compare_config
    from qalign.compare.runner import collect_offline_data

    config = load_compare_config(str(compare_yaml(tmp_path, tiny_model_dir)))
    config.root.mkdir(parents=True)
    seconds = []
    with FileLock(str(config.root / "offline_data.lock")):  # the first run, mid-collection
        waiting = threading.Thread(target=lambda: seconds.append(collect_offline_data(config)))
        waiting.start()
        time.sleep(1.0)
        assert waiting.is_alive()  # blocked on the lock, not collecting beside it
        (config.root / "offline_data.done.json").write_text(json.dumps({"seconds": 12.5, "rows": 32}))
    waiting.join(timeout=60)
    assert seconds == [12.5]
    assert not (config.root / "offline_data.log").exists()


@pytest.mark.vllm
def test_kl_of_a_guided_policy_sampled_by_vllm_is_measured_as_for_hf(tiny_model_dir, tmp_path):
    """vLLM's guided sampler reports no KL: the comparison measures it with HF's guided engine, on the same
    prompts and seed, so the number is the one an HF-sampled guided policy gets."""
    from tests.needs import require

    require("vllm")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from qalign.compare.config import CompareConfig, HeldoutConfig, MethodPlan
    from qalign.compare.runner import measure_kl
    from qalign.decoding.guided import GuidanceConfig, load_guided_policy, save_guided_policy
    from qalign.models import load_model
    from qalign.value_model import QSharpValueModel, ValueHeadConfig

    torch.manual_seed(0)
    value_model = QSharpValueModel.from_reference(str(tiny_model_dir), ValueHeadConfig(num_layers=1))
    with torch.no_grad():
        value_model.score.weight.normal_(0.0, 1.0)
    value_model.save_pretrained(tmp_path / "qsharp" / "value_model")
    save_guided_policy(tmp_path / "qsharp", str(tiny_model_dir), "value_model", GuidanceConfig(eta=0.3, top_k=6))
    config = CompareConfig(output_dir=str(tmp_path), budget=8, methods={"qsharp": {}},
                           shared={"model_name_or_path": str(tiny_model_dir), "dataset_name": "arithmetic",
                                   "prompt_template": "plain", "max_completion_length": 8},
                           heldout=HeldoutConfig(problems=3, kl_problems=3))  # fmt: skip
    plan = MethodPlan("qsharp", "qsharp", {"output_dir": str(tmp_path / "qsharp")}, samples=8)
    ref = load_model(str(tiny_model_dir)).eval()
    measured = {}
    for backend in ("hf", "vllm"):
        policy = load_guided_policy(tmp_path / "qsharp", backend=backend, max_model_len=256)
        measured[backend] = measure_kl(config, plan, policy, ref)
        policy.close()
    assert measured["vllm"] == measured["hf"]
    assert measured["hf"]["kl_per_token"] > 0.01 and measured["hf"]["tokens"] > 0
