"""Summary tables, the plot, and comparing two runs."""

from __future__ import annotations

import json

import pytest

from qalign.eval.report import compare_runs, load_run, one_line, summary_markdown, write_reports


def _summary(model: str, pass1: float, pass4: float, benchmarks=("gsm8k",)) -> dict:
    result = {
        "problems": 10,
        "n": 4,
        "samples": 40,
        "pass@k": {"1": pass1, "2": (pass1 + pass4) / 2, "4": pass4},
        "maj@k": {"1": pass1, "2": pass1, "4": pass1 + 0.05},
        "mean@n": pass1,
        "answered": 0.9,
        "truncated": 0.1,
        "mean_completion_tokens": 50.0,
    }
    return {
        "policy": {"kind": "engine", "model": model},
        "prompt_template": "boxed",
        "system_prompt": None,
        "sampling": {
            "n": 4,
            "temperature": 0.6,
            "top_p": 0.95,
            "top_k": 0,
            "max_tokens": 64,
            "stop": None,
            "seed": 0,
            "problems_per_call": 1,
        },
        "k_values": [1, 2, 4],
        "benchmarks": {name: dict(result) for name in benchmarks},
    }


def test_one_line():
    result = _summary("m", 0.41, 0.73)["benchmarks"]["gsm8k"]
    assert one_line("gsm8k", result) == "gsm8k: pass@1 0.410 pass@4 0.730 maj@4 0.460 (n=4, 10 problems)"
    single = {"problems": 3, "n": 1, "pass@k": {"1": 0.5}, "maj@k": {"1": 0.5}}
    assert one_line("aime24", single) == "aime24: pass@1 0.500 (n=1, 3 problems)"


def test_markdown_table():
    text = summary_markdown(_summary("base", 0.4, 0.7))
    assert "| benchmark | problems | n | pass@1 | pass@2 | pass@4 | maj@1 | maj@2 | maj@4 | mean@n |" in text
    assert "| gsm8k | 10 | 4 | 0.400 | 0.550 | 0.700 | 0.400 | 0.400 | 0.450 | 0.400 | 0.900 | 0.100 |" in text
    assert "temperature=0.6" in text and "**policy** base" in text


def test_write_reports_and_load_run(tmp_path):
    summary = _summary("base", 0.4, 0.7, benchmarks=("gsm8k", "math500"))
    paths = write_reports(tmp_path, summary)
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert load_run(tmp_path) == summary == load_run(tmp_path / "summary.json")
    with pytest.raises(FileNotFoundError, match="no eval summary"):
        load_run(tmp_path / "elsewhere")


def test_compare_runs_side_by_side():
    a = _summary("base", 0.40, 0.70, benchmarks=("gsm8k", "math500"))
    b = _summary("grpo", 0.50, 0.65, benchmarks=("gsm8k", "aime24"))
    text = compare_runs(a, b, labels=("runA", "runB"))
    lines = text.splitlines()
    assert lines[0] == "runA: base (T=0.6, n=4)" and lines[1] == "runB: grpo (T=0.6, n=4)"
    assert "| benchmark | metric | runA | runB | Δ (runB − runA) |" in lines
    assert "| gsm8k | pass@1 | 0.400 | 0.500 | +0.100 |" in lines
    assert "| gsm8k | pass@4 | 0.700 | 0.650 | -0.050 |" in lines
    assert "| math500 | pass@1 | 0.400 | — | — |" in lines  # only in run A
    assert "| aime24 | pass@1 | — | 0.500 | — |" in lines  # only in run B
    assert "| gsm8k | problems | 10 | 10 | |" in lines


def test_compare_from_the_command_line(tmp_path, capsys):
    from qalign.eval.__main__ import main

    for name, pass1 in (("a", 0.25), ("b", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(_summary(name, pass1, 0.75)))
    assert main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "| gsm8k | pass@1 | 0.250 | 0.500 | +0.250 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--compare", str(tmp_path / "a")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["--compare", str(tmp_path / "a"), str(tmp_path / "missing")])
    assert "no eval summary" in capsys.readouterr().err
