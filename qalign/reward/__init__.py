"""Rule-based rewards for verifiable math answers.

extract_answer  - final answer of a completion (\\boxed, ####, "the answer is")
grade           - time-bounded equivalence: exact fast path, then math-verify
accuracy_reward, format_reward, make_accuracy_reward - TRL reward functions
REWARD_FUNCTIONS, get_reward_functions - pick reward functions by name
"""

from qalign.reward.extract import extract_answer, extract_boxed
from qalign.reward.functions import (
    REWARD_FUNCTIONS,
    accuracy_reward,
    completion_text,
    format_reward,
    get_reward_functions,
    make_accuracy_reward,
)
from qalign.reward.normalize import fast_equal, normalize_answer
from qalign.reward.verify import MAX_ANSWER_CHARS, extract_gold, grade, shutdown_workers, warm_up

__all__ = [
    "MAX_ANSWER_CHARS",
    "REWARD_FUNCTIONS",
    "accuracy_reward",
    "completion_text",
    "extract_answer",
    "extract_boxed",
    "extract_gold",
    "fast_equal",
    "format_reward",
    "get_reward_functions",
    "grade",
    "make_accuracy_reward",
    "normalize_answer",
    "shutdown_workers",
    "warm_up",
]
