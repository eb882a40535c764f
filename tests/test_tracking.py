"""``qalign.tracking``: report_to is checked up front, and what a Tracker logs is what TensorBoard reads back."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qalign.tracking import Tracker, check_report_to
from tests.tensorboard_events import read_scalars

REPO = Path(__file__).resolve().parents[1]


def test_report_to_is_checked_before_anything_runs():
    assert check_report_to("none") == [] == check_report_to(["none"]) == check_report_to(None)
    assert check_report_to(["tensorboard"]) == ["tensorboard"] == check_report_to("tensorboard")
    with pytest.raises(ValueError, match="'tensorbored' is not a tracker qalign can send to; valid: none, tensorboard"):
        check_report_to(["tensorbored"])


@pytest.mark.skipif(importlib.util.find_spec("trackio") is not None, reason="trackio is installed here")
def test_a_tracker_that_is_not_installed_is_named():
    with pytest.raises(ValueError, match=re.escape("report_to: trackio is not installed; `pip install trackio`")):
        check_report_to(["trackio"])


def test_tensorboard_gets_the_finite_numbers(tmp_path):
    with Tracker(["tensorboard"], tmp_path, "eval", {"model": "tiny"}) as tracker:
        sent = tracker.log({"gsm8k/pass@1": 0.25, "gsm8k/maj@4": None, "gsm8k/mean@n": math.nan, "x": 3}, step=2)
    assert sent == {"gsm8k/pass@1": 0.25, "x": 3.0}
    assert read_scalars(tmp_path / "runs") == {"gsm8k/pass@1": [(2, 0.25)], "x": [(2, 3.0)]}


def test_none_writes_nothing(tmp_path):
    with Tracker("none", tmp_path, "eval") as tracker:
        tracker.log({"a": 1.0})
    assert not (tmp_path / "runs").exists()


def test_eval_cli_reports_what_it_prints(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "qalign.cli", "eval", "--config", str(REPO / "configs" / "eval_demo.yaml"),
               "--model_name_or_path", str(tiny_model_dir), "--prompt_template", "plain", "--limit", "3", "--n", "2",
               "--max_tokens", "4", "--show_progress", "false", "--output_dir", str(out),
               "--report_to", "tensorboard"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"arithmetic: pass@1 (\S+) pass@2 (\S+) maj@2 (\S+)", result.stdout)
    assert printed, result.stdout
    scalars = read_scalars(out / "runs")
    logged = [scalars[f"arithmetic/{name}"][0][1] for name in ("pass@1", "pass@2", "maj@2")]
    assert [f"{value:.3f}" for value in logged] == list(printed.groups())
    summary = json.loads((out / "summary.json").read_text())["benchmarks"]["arithmetic"]
    assert scalars["arithmetic/truncated"] == [(0, pytest.approx(summary["truncated"]))]
