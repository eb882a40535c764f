"""Answer equivalence with a hard time bound.

``grade`` = extract the final answer, try the exact sympy-free fast path
(``normalize.fast_equal``), and only if that cannot decide, ask math-verify in
a worker process that is killed at the deadline (``_pool``).
"""

from __future__ import annotations

import logging

from qalign.reward import _pool
from qalign.reward.extract import extract_answer
from qalign.reward.normalize import fast_equal

__all__ = ["MAX_ANSWER_CHARS", "extract_gold", "grade", "shutdown_workers", "warm_up"]

logger = logging.getLogger(__name__)

# Real final answers are short; a multi-kilobyte "answer" is degenerate output
# whose parsing alone could eat the time budget, so it scores 0 without sympy.
MAX_ANSWER_CHARS = 1000

_LOG_PRED_CHARS = 200


def _truncate(text: str, limit: int = _LOG_PRED_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"...[{len(text) - limit} more chars]"


def extract_gold(gold: str | int | float) -> str:
    """The reference answer from a dataset field.

    A GSM8K answer field ("...reasoning... #### 72") or a MATH solution with
    ``\\boxed{}`` goes through the same extractor as completions; a bare answer
    ("18", "\\frac{3}{4}") is used as is. Numeric columns are accepted too.
    """
    gold = str(gold).strip()
    if "####" in gold or "\\boxed" in gold or "\\fbox" in gold:
        extracted = extract_answer(gold)
        if extracted is not None:
            return extracted
    return gold


def grade(
    completion: str,
    gold: str,
    *,
    fallback_last_number: bool = False,
    timeout: float = 5.0,
) -> bool:
    """True iff the completion's final answer equals the reference answer.

    Args:
        completion: model output; its answer is found by ``extract_answer``.
        gold: bare answer, GSM8K answer field or MATH solution (``extract_gold``).
        fallback_last_number: use the last number in the completion when it
            has no explicit answer marker.
        timeout: seconds math-verify may spend on this comparison. It runs in a
            separate process that is killed at the deadline, so this works from
            any thread. Starting a worker (once, ~1 s) is not charged to it.

    Scoring rule: anything that prevents a verdict counts as wrong. No
    extractable answer, an answer over ``MAX_ANSWER_CHARS`` characters, a
    math-verify timeout, a math-verify exception or a crashed worker all
    return False (timeouts and errors are logged as warnings).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    pred = extract_answer(completion, fallback_last_number=fallback_last_number)
    if pred is None:
        return False
    gold_answer = extract_gold(gold)
    if not gold_answer:
        logger.warning("empty gold answer; scoring 0")
        return False
    if len(pred) > MAX_ANSWER_CHARS:
        return False
    verdict = fast_equal(pred, gold_answer)
    if verdict is not None:
        return verdict
    try:
        return _pool.get_pool().compare(gold_answer, pred, timeout)
    except _pool.WorkerTimeout:
        logger.warning(
            "math-verify timed out after %.1f s; scoring 0 (gold=%r, prediction=%r)",
            timeout,
            _truncate(gold_answer),
            _truncate(pred),
        )
    except (_pool.ComparisonError, _pool.WorkerError) as exc:
        logger.warning(
            "math-verify failed (%s); scoring 0 (gold=%r, prediction=%r)",
            exc,
            _truncate(gold_answer),
            _truncate(pred),
        )
    return False


def warm_up(num_workers: int = 1) -> None:
    """Start math-verify workers now (e.g. before training) instead of on first use."""
    _pool.get_pool().warm_up(num_workers)


def shutdown_workers() -> None:
    """Stop the math-verify workers; the next ``grade`` starts new ones."""
    _pool.shutdown_pool()
