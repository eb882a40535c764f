"""TRL-signature reward functions and the name registry."""

from __future__ import annotations

import pytest

from qalign.reward import functions
from qalign.reward.functions import (
    REWARD_FUNCTIONS,
    accuracy_reward,
    completion_text,
    format_reward,
    get_reward_functions,
    make_accuracy_reward,
)

COMPLETIONS = [
    r"48 + 24 = 72, so \boxed{72}.",
    r"\boxed{71}",
    "Adding up, 48 + 24 = 72.\n#### 72",
    r"I am not sure, \boxed{72",
    r"\boxed{\frac{\sqrt{2}}{2}}",  # needs math-verify
    "",
    "The answer is 72.",
    r"\boxed{x^2+2x+2}",  # needs math-verify
]
GSM8K_FIELD = "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
ANSWERS = ["72", "72", GSM8K_FIELD, "72", r"\sqrt{2}/2", "72", "72", "(x+1)^2"]
EXPECTED_ACCURACY = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
EXPECTED_FORMAT = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def _conversational(texts: list[str]) -> list[list[dict[str, str]]]:
    return [[{"role": "assistant", "content": t}] for t in texts]


def _trl_call(fn, completions, **columns):
    """Call ``fn`` the way TRL's GRPOTrainer does (keywords, extra columns)."""
    return fn(
        prompts=["q"] * len(completions),
        completions=completions,
        completion_ids=[[1, 2, 3]] * len(completions),
        trainer_state=None,
        **columns,
    )


def test_accuracy_reward_string_completions_in_order() -> None:
    rewards = _trl_call(accuracy_reward, COMPLETIONS, answer=ANSWERS)
    assert rewards == EXPECTED_ACCURACY
    assert all(type(r) is float for r in rewards)


def test_accuracy_reward_conversational_completions() -> None:
    assert _trl_call(accuracy_reward, _conversational(COMPLETIONS), answer=ANSWERS) == EXPECTED_ACCURACY


def test_format_reward() -> None:
    assert _trl_call(format_reward, COMPLETIONS) == EXPECTED_FORMAT
    assert _trl_call(format_reward, _conversational(COMPLETIONS)) == EXPECTED_FORMAT


def test_completion_text_variants() -> None:
    assert completion_text("plain") == "plain"
    messages = [
        {"role": "assistant", "content": "step one"},
        {"role": "tool", "content": r"\boxed{999}"},  # a tool result is not the model's answer
        {"role": "assistant", "content": [{"type": "text", "text": r"\boxed{4}"}]},
    ]
    assert completion_text(messages) == "step one\n" + r"\boxed{4}"
    assert _trl_call(accuracy_reward, [messages], answer=["4"]) == [1.0]


def test_fallback_variant_and_names() -> None:
    completions = ["so it is 42", "so it is 41"]
    assert _trl_call(accuracy_reward, completions, answer=["42", "42"]) == [0.0, 0.0]
    last_number = REWARD_FUNCTIONS["accuracy_last_number"]
    assert _trl_call(last_number, completions, answer=["42", "42"]) == [1.0, 0.0]
    assert accuracy_reward.__name__ == "accuracy_reward"
    assert last_number.__name__ == "accuracy_last_number_reward"
    assert make_accuracy_reward(name="gsm8k_acc").__name__ == "gsm8k_acc"
    assert format_reward.__name__ == "format_reward"


def test_factory_passes_timeout_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_grade(completion, gold, *, fallback_last_number, timeout):
        seen.append((completion, gold, fallback_last_number, timeout))
        return completion == "right"

    monkeypatch.setattr(functions, "grade", fake_grade)
    reward = make_accuracy_reward(fallback_last_number=True, timeout=2.5)
    assert _trl_call(reward, ["right", "wrong", "right"], answer=["a", "b", "c"]) == [1.0, 0.0, 1.0]
    assert sorted(seen) == [("right", "a", True, 2.5), ("right", "c", True, 2.5), ("wrong", "b", True, 2.5)]


def test_accuracy_reward_needs_answer_column() -> None:
    with pytest.raises(ValueError, match=r"'answer'.*solution"):
        _trl_call(accuracy_reward, ["x"], solution=["1"])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        _trl_call(accuracy_reward, ["x", "y"], answer=["1"])
    with pytest.raises(ValueError, match="timeout"):
        make_accuracy_reward(timeout=0)


def test_registry_names() -> None:
    assert sorted(REWARD_FUNCTIONS) == ["accuracy", "accuracy_last_number", "format"]
    assert get_reward_functions(["format", "accuracy"]) == [format_reward, accuracy_reward]


def test_registry_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        get_reward_functions(["accuracy", "acuracy"])
    message = str(info.value)
    assert "'acuracy'" in message
    for name in ("accuracy", "accuracy_last_number", "format"):
        assert name in message


@pytest.mark.parametrize("path", ["qalign.reward.functions:format_reward", "qalign.reward.functions.format_reward"])
def test_registry_imports_dotted_paths(path: str) -> None:
    (function,) = get_reward_functions([path])
    assert function.__wrapped__ is format_reward  # guarded, as every function named by path (qalign.reward.guard)


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("qalign.reward.no_such_module:fn", "cannot import module 'qalign.reward.no_such_module'"),
        ("qalign.reward.functions:no_such_fn", "has no attribute 'no_such_fn'"),
        ("qalign.reward.functions:REWARD_FUNCTIONS", "is not callable"),
    ],
)
def test_registry_bad_paths(path: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        get_reward_functions([path])
