"""bench/train_throughput.py runs every trainer on one shape and reports consistent numbers (no timing goals:
those are for the GPU run; this keeps the benchmark from rotting)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_every_trainer_reports_tokens_per_second_and_a_ratio(tiny_model_dir, tmp_path):
    out = tmp_path / "throughput.json"
    command = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--model", str(tiny_model_dir),
               "--dtype", "float32", "--batch", "4", "--num-generations", "2", "--prompt-length", "6",
               "--completion-length", "8", "--steps", "2", "--output-dir", str(tmp_path / "runs"),
               "--json", str(out), "--peak-tflops", "1", "--rounds", "2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results) == ["sft", "shiq", "dqo", "trl_grpo", "grpo", "shiq_online"]
    parameters = results["sft"]["parameters"]
    for name, r in results.items():
        assert len(r["all_step_seconds"]) == 2 * 2, name  # 2 steps in each of 2 rounds
        assert len(r["round_step_seconds"]) == 2, name
        # The reported step time is the median of the rounds' (each the median of its steps after the warm-up).
        assert r["round_step_seconds"] == [r["all_step_seconds"][1], r["all_step_seconds"][3]], name
        assert r["step_seconds"] == pytest.approx(sum(r["round_step_seconds"]) / 2), name
        assert r["tokens_per_step"] == 4 * (6 + 8)
        assert r["tokens_per_second"] == pytest.approx(r["tokens_per_step"] / r["step_seconds"])
        # MFU = 6 N tokens/s / peak, the peak given as 1 TFLOP/s.
        assert r["mfu"] == pytest.approx(6 * parameters * r["tokens_per_second"] / 1e12)
    assert "x an SFT step" in result.stdout and "x TRL GRPO tokens/s" in result.stdout
    # The ratio is the median over rounds of the ratio within each round.
    online, grpo = results["shiq_online"]["round_step_seconds"], results["grpo"]["round_step_seconds"]
    ratios = sorted(a / b for a, b in zip(online, grpo, strict=True))
    assert f"{sum(ratios) / 2:.3f}x a GRPO step (rounds {ratios[0]:.3f}–{ratios[1]:.3f})" in result.stdout
