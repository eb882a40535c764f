"""grade(): verdict table, time bounds, threads and failure handling."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from qalign.reward import _pool
from qalign.reward.verify import MAX_ANSWER_CHARS, extract_gold, grade, warm_up

GSM8K_GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)
MATH_GOLD = r"The probability is $\frac{6}{8} = \boxed{\frac{3}{4}}$."

# (completion, gold, fallback_last_number, expected verdict)
GRADE_CASES = [
    (r"So the answer is $\boxed{18}$.", "18", False, True),
    (r"\boxed{17}", "18", False, False),
    # the last box counts, in both directions
    (r"First \boxed{18}, but wait, it is \boxed{20}.", "18", False, False),
    (r"First \boxed{20}, on reflection \boxed{18}.", "18", False, True),
    ("", "18", False, False),
    # unbalanced box: no boxed answer; an earlier "answer is" still counts
    (r"The total is \boxed{18", "18", False, False),
    (r"The answer is 18. So \boxed{18", "18", False, True),
    # GSM8K: full answer field as gold
    ("48 + 24 = 72\n#### 72", GSM8K_GOLD, False, True),
    ("48 + 24 = 71\n#### 71", GSM8K_GOLD, False, False),
    (r"$\boxed{72}$", GSM8K_GOLD, False, True),
    ("The answer is 72.", GSM8K_GOLD, False, True),
    # thousands separators, currency, units, percent
    ("#### 1,234", "1234", False, True),
    (r"\boxed{1234}", "1,234", False, True),
    (r"\boxed{1,234}", "1243", False, False),
    (r"\boxed{\$18}", "18", False, True),
    ("The answer is $18.", "$18", False, True),
    (r"\boxed{5\text{ cm}}", "5", False, True),
    (r"\boxed{10\%}", "10", False, True),
    # fractions vs decimals, exact
    (r"\boxed{\frac{1}{2}}", "0.5", False, True),
    (r"\boxed{0.5}", r"\frac{1}{2}", False, True),
    (r"\boxed{\dfrac{3}{4}}", "0.75", False, True),
    (r"\boxed{\frac12}", "1/2", False, True),
    (r"\boxed{5.0}", "5", False, True),
    (r"\boxed{0.333}", r"\frac{1}{3}", False, False),
    (r"\boxed{0.75}", MATH_GOLD, False, True),  # MATH solution as gold
    # negatives
    (r"\boxed{-7}", "-7", False, True),
    (r"\boxed{7}", "-7", False, False),
    ("#### -3", "-3", False, True),
    # sentences
    ("The answer is 42.", "42", False, True),
    ("The final answer is 42", "24", False, False),
    # needs math-verify
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", False, True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", False, True),
    (r"\boxed{x^2+2x+2}", "(x+1)^2", False, False),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", False, True),
    (r"\boxed{\sqrt{4}}", "2", False, True),
    (r"\boxed{x=3}", "3", False, True),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", False, True),
    (r"\boxed{(1,2)}", "(2,1)", False, False),
    # text answers
    (r"\boxed{\text{Monday}}", "Monday", False, True),
    (r"\boxed{\text{Tuesday}}", r"\text{Monday}", False, False),
    # no marker: only the fallback finds the number
    ("I think it is 42", "42", False, False),
    ("I think it is 42", "42", True, True),
    ("I think it is 41", "42", True, False),
]


@pytest.mark.parametrize(("completion", "gold", "fallback", "expected"), GRADE_CASES)
def test_grade_table(completion: str, gold: str, fallback: bool, expected: bool) -> None:
    assert grade(completion, gold, fallback_last_number=fallback) is expected


@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        (GSM8K_GOLD, "72"),
        (MATH_GOLD, r"\frac{3}{4}"),
        ("  18 ", "18"),
        (r"\frac{3}{4}", r"\frac{3}{4}"),
        (18, "18"),
    ],
)
def test_extract_gold(gold, expected: str) -> None:
    assert extract_gold(gold) == expected


def test_pathological_power_tower_is_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    warm_up()  # worker start-up is not part of the comparison deadline
    caplog.set_level(logging.WARNING, logger="qalign.reward.verify")
    start = time.monotonic()
    verdict = grade(r"\boxed{9^{9^{9^{9}}}}", "1", timeout=1.5)
    elapsed = time.monotonic() - start
    assert verdict is False
    assert 1.4 < elapsed < 5.0  # it really ran into the deadline, and stopped there
    messages = [r.getMessage() for r in caplog.records if "timed out" in r.getMessage()]
    assert len(messages) == 1
    assert "gold='1'" in messages[0] and "9^{9^{9^{9}}}" in messages[0]
    # the killed worker was replaced: math-verify still answers afterwards
    assert grade(r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}") is True


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("Let me think step by step. " * 4000 + r"So $\boxed{x^2+2x+1}$.", "(x+1)^2", True),
        ("Let me think step by step. " * 4000 + r"So $\boxed{x^2+2x+2}$.", "(x+1)^2", False),
        ("\\boxed{" + "(x+" * 34_000 + "1", "1", False),  # unbalanced, 100k chars
        ("\\boxed{" + "x+" * 50_000 + "1}", "1", False),  # over-long answer
        ("12 " * 34_000, "12", False),  # fallback off: no answer
    ],
)
def test_100k_completion_is_graded_quickly(completion: str, gold: str, expected: bool) -> None:
    assert len(completion) >= 100_000
    start = time.monotonic()
    assert grade(completion, gold) is expected
    assert time.monotonic() - start < 5.0


def test_overlong_answer_skips_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden():
        raise AssertionError("math-verify must not be called")

    monkeypatch.setattr(_pool, "get_pool", forbidden)
    answer = "x+" * (MAX_ANSWER_CHARS // 2) + "1"
    assert len(answer) > MAX_ANSWER_CHARS
    assert grade(r"\boxed{" + answer + "}", answer) is False


def test_grade_from_worker_threads() -> None:
    cases = [
        (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", True),
        (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", True),
        (r"\boxed{x^2+2x+2}", "(x+1)^2", False),
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{\pi}", r"\frac{\pi}{2}", False),
        (r"\boxed{x^2-1}", "(x-1)(x+1)", True),
    ]

    def run(case):
        assert threading.current_thread() is not threading.main_thread()
        completion, gold, _ = case
        return grade(completion, gold)

    with ThreadPoolExecutor(max_workers=3) as executor:
        verdicts = list(executor.map(run, cases))
    assert verdicts == [expected for _, _, expected in cases]


class _FailingPool:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def compare(self, gold: str, pred: str, timeout: float) -> bool:
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        _pool.ComparisonError("RecursionError: boom"),
        _pool.WorkerError("math-verify worker exited (return code -9)"),
    ],
)
def test_math_verify_failure_scores_zero_and_logs(
    exc: Exception, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_pool, "get_pool", lambda: _FailingPool(exc))
    caplog.set_level(logging.WARNING, logger="qalign.reward.verify")
    assert grade(r"\boxed{\sqrt{4}}", "2") is False
    assert any(str(exc) in r.getMessage() and "gold='2'" in r.getMessage() for r in caplog.records)


def test_worker_that_died_while_idle_is_replaced() -> None:
    pool = _pool.get_pool()
    pool.warm_up()
    with pool._cond:
        idle = list(pool._idle)
    assert idle, "warm_up should leave an idle worker"
    for worker in idle:
        os.kill(worker.proc.pid, 9)
        worker.proc.wait()
    assert grade(r"\boxed{2\sqrt{3}}", r"\sqrt{12}") is True


def test_nonpositive_timeout_is_rejected() -> None:
    with pytest.raises(ValueError, match="timeout"):
        grade(r"\boxed{1}", "1", timeout=0)
