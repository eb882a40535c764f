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
