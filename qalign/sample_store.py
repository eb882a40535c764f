"""The one resumable sample store: an append-only JSONL of records beside the settings that made them.

Evaluation, Q-probe sampling and Q# collection all pay for samples chunk by chunk and must survive a kill,
so they share one rule set:

- ``<name>.jsonl`` only grows: each ``append`` is one ``write`` + ``flush``, so a kill leaves whole records
  plus at most one torn last line. Opening the store cuts that torn line off (it is no record); every whole
  record is kept, even one a caller will sample again.
- ``<name>.meta.json`` holds the settings (written atomically). Reopening with other settings is a
  ``SettingsMismatch`` naming each key that differs, its old and new value, and the caller's way to start
  over; the files are left exactly as they were. Only an explicit ``overwrite`` deletes them.
- Settings say how records were made, not which problems they answer: a caller whose records carry their
  problem (``question`` and ``gold``, or whatever ``problem_of`` reads) calls ``refuse_other_problems``, so
  that samples of a data file edited since, or of a hub dataset revised since, are refused rather than
  graded against other problems.
- ``chunk_seed`` gives each chunk a seed that depends on nothing but its own identity, so a chunk sampled
  on resume draws what it would have drawn in an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qalign.atomic import write_atomic
from qalign.config import ConfigError

__all__ = ["SampleStore", "SettingsMismatch", "chunk_seed", "read_records", "refuse_other_problems", "settings_path"]

logger = logging.getLogger(__name__)

_ABSENT = "(absent)"  # how a key one side lacks shows in a mismatch message


def _question_and_gold(record: dict[str, Any]) -> tuple[Any, Any]:
    """A store of graded samples names its problem by question and gold answer (eval, Q-probe)."""
    return record["question"], record["gold"]


def chunk_seed(*parts: object) -> int:
    """31-bit seed of one chunk (every backend accepts it): a hash of ``":".join(parts)``, so chunks draw
    independent streams and no chunk's seed depends on the others.

    Callers lead with a namespace ("qsharp", "probe") so two tools never share streams. Eval passes
    ``(seed, benchmark, chunk)`` without one: that is the string its stores were seeded with before this
    module existed, kept so those stores resume with the same seeds (Q#'s "qsharp:…" likewise).
    """
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def settings_path(path: str | Path) -> Path:
    """Where the settings of the store ``path`` live: ``x.jsonl`` → ``x.meta.json``."""
    path = Path(path)
    return path.with_name(path.stem + ".meta.json")


class SettingsMismatch(ConfigError):
    """A store exists with records made under other settings (``differences``: key → (stored, requested))."""

    def __init__(self, path: Path, differences: dict[str, tuple[Any, Any]], restart: str):
        self.path, self.differences = path, differences
        details = ", ".join(f"{key}: {old!r} → {new!r}" for key, (old, new) in differences.items())
        super().__init__(f"{path} was written with other settings ({details}); nothing was changed. To start "
                         f"over: {restart}")  # fmt: skip


class SampleStore:
    """One append-only JSONL of records plus the settings that produced them (see the module docstring).

    Args:
        path: the ``.jsonl`` file (its folder is created).
        settings: JSON-able values that change a record; compared on every open.
        restart: how the caller's user starts over (e.g. ``"overwrite: true, or another output_dir"``),
            quoted in the mismatch error.
        overwrite: delete the records and settings first (logged: this is the one way data goes).
        key: a record's identity; ``rows`` then maps each key to the first record written with it, so a
            chunk sampled again only needs its missing records appended.
    """

    def __init__(
        self,
        path: str | Path,
        settings: Mapping[str, Any],
        restart: str,
        overwrite: bool = False,
        key: Callable[[dict[str, Any]], Hashable] | None = None,
    ):
        self.path = Path(path)
        self.settings_path = settings_path(self.path)
        self._key = key
        self._restart = restart
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _start_over(self.path, self.settings_path)
        data = self.path.read_bytes() if self.path.is_file() else b""
        whole = data.rfind(b"\n") + 1  # bytes of whole lines; the rest is a torn write
        self.records = _parse(self.path, data[:whole])
        # The settings check comes before any change to the files, so a refused open leaves them byte-identical.
        self._check_settings(json.loads(json.dumps(settings)), restart)  # compared as it will read back
        if whole < len(data):
            logger.warning("%s: cutting off a half-written last line (%d bytes)", self.path, len(data) - whole)
            with self.path.open("r+b") as handle:
                handle.truncate(whole)
        self.rows: dict[Hashable, dict[str, Any]] = {}
        self._index(self.records)
        self._file = self.path.open("a", encoding="utf-8")

    def _check_settings(self, settings: dict[str, Any], restart: str) -> None:
        if self.settings_path.is_file():
            stored = json.loads(self.settings_path.read_text(encoding="utf-8"))
            if stored == settings:
                return
            if self.records:
                raise SettingsMismatch(self.path, _differences(stored, settings), restart)
            # No record was paid for under the stored settings: the new ones simply take their place.
        elif self.records:
            raise ConfigError(f"{self.path} has records but no {self.settings_path.name} saying what made them; "
                              f"nothing was changed. To start over: {restart}")  # fmt: skip
        write_atomic(self.settings_path, json.dumps(settings, indent=2, sort_keys=True))

    def refuse_other_problems(
        self,
        problems: Mapping[Hashable, Any],
        index: str,
        problem_of: Callable[[dict[str, Any]], Any] = _question_and_gold,
    ) -> None:
        """Refuse the store when a record's problem (``problem_of(record)``: its question and gold by default)
        differs from ``problems[record[index]]``, the problem now at its index (``refuse_other_problems``)."""
        refuse_other_problems(self.path, self.records, problems, index, self._restart, problem_of)

    def _index(self, records: Sequence[dict[str, Any]]) -> None:
        if self._key is not None:
            for record in records:
                self.rows.setdefault(self._key(record), record)

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Write ``records`` in one call and flush: a kill leaves them whole, or some whole plus a torn line."""
        if not records:
            return
        self._file.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        self._file.flush()
        self.records.extend(records)
        self._index(records)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def refuse_other_problems(
    path: str | Path,
    records: Sequence[dict[str, Any]],
    problems: Mapping[Hashable, Any],
    index: str,
    restart: str,
    problem_of: Callable[[dict[str, Any]], Any] = _question_and_gold,
) -> None:
    """Raise ``ConfigError`` when a record of the store ``path`` answers another problem than the one now at its
    index: ``problem_of(record) != problems[record[index]]``. Records without ``index`` (chunk markers) or of
    indices not in ``problems`` are not checked. The error is one line naming the first such problem, what
    changed and ``restart``, the caller's way to start over; it changes nothing (a store a caller only reads,
    ``read_records``, is checked the same way)."""
    for record in records:
        now = problems.get(record.get(index))
        if now is None or (stored := problem_of(record)) == now:
            continue
        was, is_now = _briefs(stored, now)
        raise ConfigError(
            f"{path} holds samples of other problems than the data now has (problem {record[index]!r}: "
            f"stored {was}, now {is_now}); no record was changed. To start over: {restart}"
        )


def _briefs(stored: Any, now: Any, limit: int = 60) -> tuple[str, str]:
    """Two problems short enough for a one-line error. (question, gold) reads ``'question' → 'gold'``, anything
    else its repr; both are cut to ``limit`` characters from just before their first difference, so two long
    problems alike at the start (a chat template's token ids, a long question) still show what changed."""
    texts = [_describe(stored), _describe(now)]
    first = next((i for i, (a, b) in enumerate(zip(*texts)) if a != b), min(map(len, texts)))
    start = texts[0].rfind(" ", 0, first - 20) + 1 if first > 20 else 0  # a word's start, ~20 characters before
    head = "..." if start else ""
    return head + _clip(texts[0][start:], limit), head + _clip(texts[1][start:], limit)


def _describe(problem: Any) -> str:
    if isinstance(problem, tuple) and len(problem) == 2 and all(isinstance(part, str) for part in problem):
        return f"{problem[0]!r} → {problem[1]!r}"
    return repr(problem)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The whole records of a store, without opening it for writing (a torn last line is skipped, not cut)."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    return _parse(path, data[: data.rfind(b"\n") + 1])


def _parse(path: Path, data: bytes) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            # Appends end in a newline, so a bad *whole* line is damage, not a kill: never guess past it.
            raise ValueError(f"{path}:{number} is not valid JSON ({error}); fix or delete the file") from None
    return records


def _start_over(path: Path, meta: Path) -> None:
    if path.is_file() or meta.is_file():
        logger.warning("overwrite: deleting %s and %s", path, meta.name)
    path.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)


def _differences(stored: dict[str, Any], requested: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Top-level keys whose values differ, as (stored, requested); nested mappings keep only what differs."""
    return {
        key: _narrow(stored.get(key, _ABSENT), requested.get(key, _ABSENT))
        for key in sorted(stored.keys() | requested.keys())
        if stored.get(key, _ABSENT) != requested.get(key, _ABSENT)
    }


def _narrow(old: Any, new: Any) -> tuple[Any, Any]:
    # A policy description or a settings section can hold many keys; the message names the ones that moved.
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return old, new
    moved = _differences(old, new)
    return {k: pair[0] for k, pair in moved.items()}, {k: pair[1] for k, pair in moved.items()}
