"""Reward functions with TRL's signature, and a registry to pick them by name.

TRL calls ``fn(prompts=..., completions=..., completion_ids=..., **columns)``
where ``columns`` are the dataset's other columns (plus trainer extras such as
``trainer_state``), and expects one float (or None) per completion.
Completions are strings, or for conversational datasets lists of messages
(``[{"role": "assistant", "content": "..."}]``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qalign.reward._pool import default_num_workers
from qalign.reward.extract import extract_boxed
from qalign.reward.guard import DEFAULT_TIMEOUT, guard_reward_function
from qalign.reward.verify import grade

__all__ = [
    "REWARD_FUNCTIONS",
    "accuracy_reward",
    "completion_text",
    "format_reward",
    "get_reward_functions",
    "make_accuracy_reward",
]

RewardFunction = Callable[..., list]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal-style parts: [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def completion_text(completion: str | list[dict[str, Any]] | dict[str, Any]) -> str:
    """The text of a completion, plain or conversational.

    For a message list, the assistant messages are joined in order (tool
    results and other roles are not the model's answer); a message without a
    role counts as the model's.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, list):
        return "\n".join(
            _content_text(m.get("content"))
            for m in completion
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
        )
    raise TypeError(f"unsupported completion type {type(completion).__name__}")


def _grade_batch(texts: list[str], golds: list[Any], fallback_last_number: bool, timeout: float) -> list[float]:
    def one(pair: tuple[str, Any]) -> float:
        text, gold = pair
        if gold is None:
            return 0.0
        return 1.0 if grade(text, gold, fallback_last_number=fallback_last_number, timeout=timeout) else 0.0

    pairs = list(zip(texts, golds))
    if len(pairs) <= 1:
        return [one(p) for p in pairs]
    # Each grade is time-bounded and the heavy part runs in worker processes,
    # so threads only wait; one thread per worker keeps them all busy.
    # map() preserves input order.
    with ThreadPoolExecutor(max_workers=min(len(pairs), default_num_workers())) as executor:
        return list(executor.map(one, pairs))


def make_accuracy_reward(
    fallback_last_number: bool = False,
    timeout: float = 5.0,
    name: str | None = None,
) -> RewardFunction:
    """Build an accuracy reward: 1.0 if the completion's answer matches ``answer``.

    Args:
        fallback_last_number: grade the last number when the completion has
            no explicit answer (``\\boxed``, ``####``, "the answer is").
        timeout: per-completion math-verify time limit in seconds; a timeout
            scores 0.0.
        name: ``__name__`` of the returned function, which TRL uses as the
            metric name; defaults to "accuracy_reward" /
            "accuracy_last_number_reward".
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")

    def reward(
        prompts: list | None = None,
        completions: list | None = None,
        answer: list | None = None,
        **kwargs: Any,
    ) -> list[float]:
        if completions is None:
            raise ValueError("accuracy reward needs the 'completions' argument")
        if answer is None:
            raise ValueError(
                "accuracy reward needs a dataset column named 'answer' with the reference answers; "
                f"got columns: {sorted(kwargs)}"
            )
        if len(answer) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
        texts = [completion_text(c) for c in completions]
        return _grade_batch(texts, list(answer), fallback_last_number, timeout)

    reward.__name__ = reward.__qualname__ = name or (
        "accuracy_last_number_reward" if fallback_last_number else "accuracy_reward"
    )
    reward.__doc__ = (
        f"1.0 if the completion's final answer equals the 'answer' column, else 0.0 "
        f"(fallback_last_number={fallback_last_number}, timeout={timeout} s; timeouts score 0.0)."
    )
    return reward


accuracy_reward = make_accuracy_reward()


def format_reward(prompts: list | None = None, completions: list | None = None, **kwargs: Any) -> list[float]:
    """1.0 if the completion ends its reasoning with a complete ``\\boxed{...}`` answer, else 0.0.

    Uses the same rule as answer extraction: the last box counts, so a box cut
    off by the length limit (``\\boxed{12``) or an empty one scores 0.0.
    """
    if completions is None:
        raise ValueError("format reward needs the 'completions' argument")
    return [1.0 if extract_boxed(completion_text(c)) is not None else 0.0 for c in completions]


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "accuracy": accuracy_reward,
    "accuracy_last_number": make_accuracy_reward(fallback_last_number=True),
    "format": format_reward,
}


def _import_function(path: str) -> RewardFunction:
    """Import "package.module:function" or "package.module.function"."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward function path {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for reward function {path!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):  # allow "module:Class.method"
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (reward function {path!r})") from None
    if not callable(obj):
        raise ValueError(f"reward function {path!r} is not callable")
    return obj


def get_reward_functions(names: list[str], timeout: float = DEFAULT_TIMEOUT) -> list[RewardFunction]:
    """Resolve reward function names (registry keys or import paths) in order. A function given by import
    path is guarded (``qalign.reward.guard``): a completion it raises on, or a call past ``timeout`` seconds,
    scores None instead of ending the run.

    Raises:
        ValueError: for a name that is neither in ``REWARD_FUNCTIONS`` nor an
            importable "package.module:function" path; the message names it and
            lists the valid registry keys.
    """
    if isinstance(names, str):  # a lone name from a config file
        names = [names]
    functions = []
    for name in names:
        if name in REWARD_FUNCTIONS:
            functions.append(REWARD_FUNCTIONS[name])
        elif ":" in name or "." in name:
            functions.append(guard_reward_function(_import_function(name), name, timeout))
        else:
            raise ValueError(
                f"unknown reward function {name!r}; valid names: {', '.join(sorted(REWARD_FUNCTIONS))} "
                "(or an import path like 'package.module:function')"
            )
    return functions
