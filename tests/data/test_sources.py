"""Datasets in one schema: bundled task, local files (real GSM8K), column detection."""

from __future__ import annotations

import json

import pytest

from qalign.config import ConfigError
from qalign.data import arithmetic, load_math_split
from qalign.reward import extract_answer


def test_arithmetic_is_deterministic_and_held_out():
    assert arithmetic.generate("test", size=20) == arithmetic.generate("test", size=20)
    train = {row["question"] for row in arithmetic.generate("train")}
    test = {row["question"] for row in arithmetic.generate("test")}
    assert len(train) > 100 and not train & test


def test_arithmetic_answers_are_correct():
    for row in arithmetic.generate("test", size=200):
        question, answer = row["question"], int(row["answer"])
        numbers = [int(tok.strip("?.,")) for tok in question.split() if tok.strip("?.,").isdigit()]
        a, b = numbers[-2:]
        if "times" in question or "in each box" in question:
            assert answer == a * b
        elif "-" in question or "gave away" in question:
            assert answer == a - b >= 0
        else:
            assert answer == a + b


def test_real_gsm8k_through_the_local_file_path(gsm8k_dir):
    test = load_math_split(str(gsm8k_dir), "test")
    assert len(test) == 1319
    first = test[0]
    assert first["question"].startswith("Janet")
    assert extract_answer(first["answer"]) == "18"
    train = load_math_split(str(gsm8k_dir / "train.jsonl"), "train", limit=10)
    assert len(train) == 10 and set(train.column_names) >= {"question", "answer"}


def test_column_detection_and_explicit_columns(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"p{i}", "final_answer": i}) for i in range(3)))
    rows = load_math_split(str(path), "train")
    assert list(rows["question"]) == ["p0", "p1", "p2"] and list(rows["answer"]) == ["0", "1", "2"]
    with pytest.raises(ConfigError, match="answer_column='gold' is not a column"):
        load_math_split(str(path), "train", answer_column="gold")


def test_missing_split_file_in_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file for split 'validation'"):
        load_math_split(str(tmp_path), "validation")
