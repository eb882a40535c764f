"""The train entry point end to end, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tensorboard_events import read_scalars

REPO = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"^before: (\d\.\d{3}) after: (\d\.\d{3})$", re.MULTILINE)


def run(command: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_tiny_model_through_the_cli(tiny_model_dir, tmp_path):
    result = run(
        [
            sys.executable,
            "-m",
            "qalign.train",
            "--config",
            "configs/demo.yaml",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--prompt_template",
            "plain",
            "--algorithm",
            "qae",
            "--max_steps",
            "2",
            "--eval_samples",
            "4",
            "--max_completion_length",
            "8",
            "--output_dir",
            str(tmp_path / "out"),
            "--save_steps",
            "1",
            "--report_to",
            "tensorboard",
            "--logging_steps",
            "1",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = SUMMARY.search(result.stdout)
    assert summary, result.stdout[-2000:]
    # TensorBoard got the training log and the held-out accuracy, equal to the printed numbers.
    scalars = read_scalars(tmp_path / "out")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    (_, before), (_, after) = scalars["eval/heldout_accuracy_before"][-1], scalars["eval/heldout_accuracy_after"][-1]
    assert (f"{before:.3f}", f"{after:.3f}") == summary.groups()
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert (tmp_path / "out" / "model.safetensors").is_file()
    card = (tmp_path / "out" / "README.md").read_text()  # QAE's card: its paper, never GRPO's DeepSeekMath
    assert "Trained with **QAE (GRPO with a K-quantile baseline)** ([arXiv 2509.22611]" in card
    assert "DeepSeekMath" not in card and "| `quantile_k` | `0.4` |" in card


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_on_the_embedded_default(tmp_path):
    """The README command: two CPU processes run to the end; rewards are gathered across them."""
    result = run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "-m",
            "qalign.train",
            "--config",
            "configs/demo.yaml",
            "--max_steps",
            "2",
            "--eval_samples",
            "8",
            "--output_dir",
            str(tmp_path / "out"),
            "--per_device_train_batch_size",
            "8",
        ],
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "grpo on 2 processes" in result.stdout, result.stdout[-2000:]
    assert len(SUMMARY.findall(result.stdout)) == 1, result.stdout[-2000:]  # printed by the main process only
    # TRL logs one reward per step, averaged over what all ranks gathered.
    assert result.stderr.count("'reward':") + result.stdout.count("'reward':") >= 2


def test_lost_rollout_workers_end_the_run_with_one_line(capsys, monkeypatch):
    """RolloutUnavailable (the trainer has already checkpointed) becomes one line and exit status 1; with
    QALIGN_DEBUG the traceback is kept."""
    from qalign.rollout.base import RolloutUnavailable
    from qalign.train import exit_on_lost_rollouts

    monkeypatch.delenv("QALIGN_DEBUG", raising=False)
    reason = "every vLLM server worker failed (http://h:1); out/checkpoint-3 holds the 3 finished step(s): restart"
    with pytest.raises(SystemExit) as stopped, exit_on_lost_rollouts():
        raise RolloutUnavailable(reason)
    assert stopped.value.code == 1
    assert capsys.readouterr().err == f"qalign: rollout: {reason}\n"
    monkeypatch.setenv("QALIGN_DEBUG", "1")
    with pytest.raises(RolloutUnavailable), exit_on_lost_rollouts():
        raise RolloutUnavailable(reason)
