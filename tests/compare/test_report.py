"""The report's paired comparisons: which baselines each method is compared with, and the numbers."""

from __future__ import annotations

import pytest

from qalign.compare.report import comparisons
from qalign.compare.stats import mcnemar_exact_p


def result(name: str, method: str, greedy: list[int] | None, sampled: list[float]) -> dict:
    return {"name": name, "method": method, "greedy": None if greedy is None else {"scores": greedy},
            "sampled": {"scores": sampled}}  # fmt: skip


def test_offline_methods_alone_are_paired_with_rft():
    results = {
        "reference": result("reference", "reference", [0, 1, 0, 0], [0.0, 0.5, 0.25, 0.0]),
        "rft": result("rft", "rft", [1, 1, 0, 0], [0.5, 0.5, 0.25, 0.0]),
        "shiq_sft": result("shiq_sft", "shiq", [1, 1, 1, 1], [0.75, 1.0, 0.5, 0.25]),
        "dqo_sft": result("dqo_sft", "dqo", [0, 1, 0, 0], [0.5, 0.5, 0.25, 0.0]),
        "qprobe": result("qprobe", "qprobe", None, [1.0, 1.0, 1.0, 1.0]),
    }
    out = comparisons(results, 0.95)
    assert set(out) == {"reference", "rft"}  # no grpo among the methods
    assert set(out["reference"]) == {"rft", "shiq_sft", "dqo_sft", "qprobe"}
    assert set(out["rft"]) == {"shiq_sft", "dqo_sft"}  # same offline data; not the probe
    shiq = out["rft"]["shiq_sft"]
    # Greedy: shiq right where rft was wrong on 2 problems, never the reverse.
    assert shiq["greedy"]["difference"] == pytest.approx(2 / 4)
    assert shiq["greedy"]["p_value"] == pytest.approx(mcnemar_exact_p(2, 0))
    # mean@n: per-problem differences (.25, .5, .25, .25).
    assert shiq["sampled"]["difference"] == pytest.approx(0.3125)
    assert out["rft"]["dqo_sft"]["greedy"]["difference"] == pytest.approx(-1 / 4)
    assert out["reference"]["qprobe"]["greedy"] is None


def test_no_two_methods_of_a_plot_share_colour_and_marker():
    """matplotlib's colour cycle repeats after ten: methods i and i + 10 differ by marker."""
    from qalign.compare.report import _marker

    styles = {(index % 10, _marker(index)) for index in range(30)}
    assert len(styles) == 30


def test_guided_value_models_are_reported_with_the_constant_beside_them(tmp_path):
    """Q#'s per-iteration diagnostics go from its trainer log to the report, flagged when uninformative."""
    import json
    from pathlib import Path

    from qalign.compare.config import MethodPlan
    from qalign.compare.report import report_markdown
    from qalign.compare.runner import value_diagnostics

    log = [{"loss": 0.7, "step": 4},
           {"qsharp/iteration": 1.0, "qsharp/heldout_value_loss": 0.639, "qsharp/constant_value_loss": 0.608,
            "qsharp/heldout_auroc": 0.354, "qsharp/heldout_kl_per_token": 0.0146,
            "qsharp/constant_value_kl_per_token": 0.0, "qsharp/heldout_rows": 20.0,
            "qsharp/value_model_uninformative": 1.0, "step": 8},
           {"qsharp/iteration": 2.0, "qsharp/heldout_value_loss": 0.487, "qsharp/constant_value_loss": 0.539,
            "qsharp/heldout_auroc": 0.651, "qsharp/heldout_kl_per_token": 0.1728,
            "qsharp/constant_value_kl_per_token": 0.0, "qsharp/heldout_rows": 16.0,
            "qsharp/value_model_uninformative": 0.0, "step": 18}]  # fmt: skip
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    plan = MethodPlan(name="cd", method="cd", samples=256, train_config={"output_dir": str(tmp_path)}, note="")
    diagnostics = value_diagnostics(plan)
    assert [d["iteration"] for d in diagnostics] == [1, 2]
    assert diagnostics[0]["uninformative"] and not diagnostics[1]["uninformative"]
    assert diagnostics[1]["heldout_auroc"] == 0.651 and diagnostics[1]["heldout_rows"] == 16.0
    assert value_diagnostics(MethodPlan(name="grpo", method="grpo", samples=256, train_config={}, note="")) is None

    record = json.loads(
        (Path(__file__).resolve().parents[2] / "docs" / "compare_demo_seed1" / "report.json").read_text()
    )
    record["rows"][-1]["value_diagnostics"] = diagnostics
    name = record["rows"][-1]["name"]
    markdown = report_markdown(record)
    assert f"| {name} | 1 | 0.639 (0.608) | 0.35 | 0.0146 (0.0000) | 20 | **no better than a constant** |" in markdown
    assert f"| {name} | 2 | 0.487 (0.539) | 0.65 | 0.1728 (0.0000) | 16 |  |" in markdown
    del record["rows"][-1]["value_diagnostics"]
    assert "value models" not in report_markdown(record)  # no guided method, no section
