"""Each benchmark maps its real schema to (id, question, answer); bad names and paths fail clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qalign.eval.benchmarks import BENCHMARKS, BenchmarkError, Problem, get_benchmark, load_benchmark

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "benchmarks"


def test_gsm8k_keeps_only_the_final_answer():
    problems = load_benchmark("gsm8k", FIXTURES / "gsm8k.jsonl")
    assert [p.answer for p in problems] == ["25", "300", "1200"]  # "#### 1,200" loses its comma
    assert [p.id for p in problems] == ["0", "1", "2"]  # no id column: the row number
    assert [p.index for p in problems] == [0, 1, 2]
    assert problems[0].question.startswith("Mara bakes 4 trays")


def test_math500_fields():
    problems = load_benchmark("math500", FIXTURES / "math500.jsonl")
    assert problems[0] == Problem(
        0, "test/prealgebra/101.json", "What is the value of $\\frac{1}{2} + \\frac{1}{4}$?", "\\frac{3}{4}"
    )
    assert [p.answer for p in problems] == ["\\frac{3}{4}", "4", "5"]


def test_aime24_fields():
    problems = load_benchmark("aime24", FIXTURES / "aime24.jsonl")
    assert [(p.id, p.answer) for p in problems] == [("60", "029"), ("61", "24")]  # "029" stays a string
    assert problems[1].question == "How many positive divisors does $360$ have?"


def test_aime25_fields():
    problems = load_benchmark("aime25", FIXTURES / "aime25.jsonl")
    assert [(p.id, p.answer) for p in problems] == [("I-1", "63"), ("II-1", "1")]
    assert problems[0].question.startswith("Find the sum of the positive integers")


def test_amc23_float_answers_become_plain_numbers():
    problems = load_benchmark("amc23", FIXTURES / "amc23.jsonl")
    assert [(p.id, p.answer) for p in problems] == [("0", "21"), ("1", "2"), ("2", "3.5")]
    assert problems[0].question == "If $a + b = 10$ and $a - b = 4$, what is $a \\cdot b$?"


def test_amc23_also_reads_the_aimo_schema():
    (problem,) = load_benchmark("amc23", FIXTURES / "amc23_aimo.jsonl")
    assert (problem.id, problem.answer) == ("7", "4")
    assert problem.question.startswith("How many integers $n$")


def test_arithmetic_is_bundled():
    from qalign.data.arithmetic import generate

    problems = load_benchmark("arithmetic", limit=5)
    rows = generate("test")[:5]
    assert [(p.question, p.answer) for p in problems] == [(r["question"], r["answer"]) for r in rows]


def test_limit_and_folder_of_split_files(tmp_path):
    shutil.copy(FIXTURES / "gsm8k.jsonl", tmp_path / "test.jsonl")  # gsm8k's split is "test"
    problems = load_benchmark("gsm8k", tmp_path, limit=2)
    assert [p.answer for p in problems] == ["25", "300"]


def test_every_registered_benchmark_has_a_fixture_or_is_bundled():
    for name, spec in BENCHMARKS.items():
        assert spec.hub_id is None or (FIXTURES / f"{name}.jsonl").is_file(), name


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(BenchmarkError) as error:
        get_benchmark("gsm9k")
    message = str(error.value)
    assert "'gsm9k'" in message and "Did you mean 'gsm8k'?" in message
    for name in BENCHMARKS:
        assert name in message


def test_missing_local_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_benchmark("gsm8k", missing)


def test_wrong_schema_names_the_missing_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    with pytest.raises(BenchmarkError, match=r"no question field; expected one of \['problem', 'question'\]"):
        load_benchmark("math500", bad)


def test_offline_hub_failure_says_how_to_fix(monkeypatch):
    import qalign.data.sources as sources

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(sources, "load_raw", offline)
    with pytest.raises(BenchmarkError, match=r"HuggingFaceH4/MATH-500.*data_files: \{math500: "):
        load_benchmark("math500")
