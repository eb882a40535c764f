"""Row formats of a prompt dataset: TRL's standard and conversational ones.

- standard: a text column holds the problem (``question``, ``problem``, ``prompt``, …); qalign's
  ``prompt_template`` wraps it and the chat template renders it;
- conversational: ``prompt`` is a list of messages (``[{"role": "system", …}, {"role": "user", …}]``),
  or a ``messages`` column holds a conversation whose trailing assistant turn (if any) is the reference
  solution. The messages *are* the prompt: they go through the chat template as they are (a config's
  ``system_prompt`` is added only when they have no system turn) and ``prompt_template`` is not applied.

Either way a row becomes ``question`` (the text of the last user turn, for logs and records), ``answer``
and, for conversational rows, ``messages`` (the prompt turns). A row that is neither — a prompt that is a
number, messages without ``role``/``content`` — is refused naming the column and the shapes that work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qalign.config import ConfigError

ROLES = ("system", "user", "assistant", "tool", "developer")


def is_messages(value: Any) -> bool:
    """A non-empty list of ``{"role": …, "content": …}`` mappings."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def conversational_column(first_row: Mapping[str, Any]) -> str | None:
    """The column that makes a dataset conversational (``prompt`` as messages, or ``messages``), else None.

    Raises ConfigError for a ``prompt``/``messages`` value that is neither text nor messages."""
    for column in ("prompt", "messages"):
        if column not in first_row:
            continue
        value = first_row[column]
        if is_messages(value):
            return column
        if column == "prompt" and isinstance(value, str):
            return None
        raise ConfigError(
            f"dataset column {column!r}: a row holds {type(value).__name__} {str(value)[:60]!r}; "
            f"expected text (standard format) or a list of {{role, content}} messages (conversational format)"
        )
    return None


def split_conversation(messages: list[Mapping[str, Any]]) -> tuple[list[dict[str, str]], str | None]:
    """(the prompt: the turns up to the last user turn, the content of the last assistant turn after it or
    None). A trailing assistant answer is the reference solution, not part of the prompt."""
    turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    unknown = sorted({t["role"] for t in turns} - set(ROLES))
    if unknown:
        raise ConfigError(f"dataset messages: unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last_user is None:
        raise ConfigError("dataset messages: a conversation has no user turn to answer")
    answers = [t["content"] for t in turns[last_user + 1 :] if t["role"] == "assistant"]
    return turns[: last_user + 1], answers[-1] if answers else None


def conversational_row(row: Mapping[str, Any], column: str, answer_column: str | None) -> dict[str, Any]:
    """``question``, ``answer`` and ``messages`` of a conversational row."""
    messages = row[column]
    if not is_messages(messages):
        raise ConfigError(f"dataset column {column!r}: a row is not a list of {{role, content}} messages")
    turns, solution = split_conversation(messages)
    answer = row.get(answer_column) if answer_column else None
    if answer is None:
        answer = solution
    if answer is None:
        raise ConfigError(f"dataset: a conversational row has no gold answer: add an 'answer' column (or set "
                          f"answer_column), or end its {column!r} with the assistant's solution")  # fmt: skip
    return {"question": turns[-1]["content"], "answer": str(answer), "messages": turns}
