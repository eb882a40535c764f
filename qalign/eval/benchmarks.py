"""Benchmark registry: each named benchmark knows where it lives and how its fields map to
``Problem(index, id, question, answer)``.

A benchmark loads from its hub id, or from a local file/folder given in the eval config
(``data_files: {name: path}``) in the same schema; a folder is read as ``<split>.jsonl`` /
``.json`` / ``.parquet`` / ``.csv`` (see ``qalign.data.sources``). Schemas mapped:

========== ====================================== ======= ================================================
name       source                                 split   fields → (id, question, answer)
========== ====================================== ======= ================================================
gsm8k      ``openai/gsm8k`` (config ``main``)     test    row number, ``question``, text after ``####`` in
                                                          ``answer`` (thousands commas removed)
math500    ``HuggingFaceH4/MATH-500``             test    ``unique_id``, ``problem``, ``answer``
                                                          (``solution``/``subject``/``level`` unused)
aime24     ``HuggingFaceH4/aime_2024``            train   ``id``, ``problem``, ``answer``
aime25     ``yentinglin/aime_2025``               train   ``id``, ``problem``, ``answer`` (same layout as
                                                          aime_2024: id, problem, solution, answer, url, year)
amc23      ``zwhe99/amc23``                       test    ``id``, ``question``, ``answer`` (a float such as
                                                          ``27.0`` in the hub copy; integral floats → ``"27"``)
arithmetic bundled (``qalign.data.arithmetic``)   test    row number, ``question``, ``answer``
========== ====================================== ======= ================================================

Where a field is listed with alternatives (``problem`` or ``question`` …) the first present wins,
so common re-uploads (e.g. ``AI-MO/aimo-validation-amc`` with ``problem``) load too. A missing id
column falls back to the row number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BENCHMARKS", "BenchmarkError", "BenchmarkSpec", "Problem", "get_benchmark", "load_benchmark"]


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded as asked: the message says what to fix."""


@dataclass(frozen=True)
class Problem:
    """One evaluation problem. ``index`` is the row number in the benchmark split, so it stays
    the same whatever ``limit`` selects (results and seeds are keyed by it)."""

    index: int
    id: str
    question: str
    answer: str
    messages: list[dict[str, str]] | None = None  # a conversational row's prompt turns (qalign.data.formats)


def _plain_answer(value: Any) -> str:
    """A gold answer as a string; integral floats lose their ``.0`` (AMC hub copies store 27.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _gsm8k_answer(value: Any) -> str:
    """The final answer of a GSM8K solution: what follows its last ``####``."""
    text = str(value)
    _, marker, final = text.rpartition("####")
    if not marker:
        return text.strip()  # already a bare answer (e.g. a pre-processed local copy)
    return final.strip().replace(",", "")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and how to read its rows."""

    name: str
    hub_id: str | None  # None: bundled with qalign
    hub_config: str | None
    split: str
    question_fields: tuple[str, ...]
    answer_fields: tuple[str, ...]
    id_fields: tuple[str, ...] = ()
    parse_answer: Callable[[Any], str] = _plain_answer

    def to_problem(self, row: Mapping[str, Any], index: int, source: str) -> Problem:
        from qalign.data.formats import conversational_column, conversational_row

        column = conversational_column(row)
        if column is not None:  # TRL's conversational format: the messages are the prompt
            answer_field = next((f for f in self.answer_fields if row.get(f) is not None), None)
            parsed = conversational_row(row, column, answer_field)
            ids = [row[f] for f in self.id_fields if row.get(f) is not None]
            return Problem(index, str(ids[0]) if ids else str(index), parsed["question"],
                           self.parse_answer(parsed["answer"]), parsed["messages"])  # fmt: skip
        question = _first_field(row, self.question_fields, "question", self.name, source)
        answer = _first_field(row, self.answer_fields, "answer", self.name, source)
        ids = [row[f] for f in self.id_fields if row.get(f) is not None]
        return Problem(index, str(ids[0]) if ids else str(index), str(question), self.parse_answer(answer))


def _first_field(row: Mapping[str, Any], fields: tuple[str, ...], role: str, name: str, source: str) -> Any:
    for field in fields:
        if field in row and row[field] is not None:
            return row[field]
    raise BenchmarkError(
        f"benchmark {name!r} from {source}: no {role} field; expected one of {list(fields)}, "
        f"the rows have {sorted(row)}"
    )


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("gsm8k", "openai/gsm8k", "main", "test", ("question",), ("answer",), (), _gsm8k_answer),
        BenchmarkSpec(
            "math500", "HuggingFaceH4/MATH-500", None, "test", ("problem", "question"), ("answer",), ("unique_id", "id")
        ),
        BenchmarkSpec(
            "aime24", "HuggingFaceH4/aime_2024", None, "train", ("problem", "question"), ("answer",), ("id",)
        ),
        BenchmarkSpec("aime25", "yentinglin/aime_2025", None, "train", ("problem", "question"), ("answer",), ("id",)),
        BenchmarkSpec("amc23", "zwhe99/amc23", None, "test", ("question", "problem"), ("answer",), ("id",)),
        BenchmarkSpec("arithmetic", None, None, "test", ("question",), ("answer",)),
    )
}


def get_benchmark(name: str) -> BenchmarkSpec:
    """The spec of a registered benchmark; unknown names list the valid ones."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, BENCHMARKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BenchmarkError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}.{hint}") from None


def load_benchmark(name: str, path: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """The problems of benchmark ``name`` (the first ``limit`` rows when given).

    ``path`` is a local file or folder in the benchmark's schema; without it the bundled task or
    the hub copy is read (the hub needs network access; offline, give ``path``).
    """
    from qalign.data.sources import load_raw

    spec = get_benchmark(name)
    if path is not None:
        local = Path(path).expanduser()
        if not local.exists():
            raise FileNotFoundError(f"benchmark {name!r}: local data {str(path)!r} does not exist")
        source = str(local)
        raw = load_raw(source, spec.split)
    elif spec.hub_id is None:
        source = "qalign (bundled)"
        raw = load_raw(name, spec.split)
    else:
        source = f"hub {spec.hub_id}"
        try:
            raw = load_raw(spec.hub_id, spec.split, spec.hub_config)
        except Exception as error:
            raise BenchmarkError(
                f"benchmark {name!r}: could not load {spec.hub_id!r} (split {spec.split!r}) from the hub: "
                f"{type(error).__name__}: {error}. Offline? Put a copy on disk and set "
                f"data_files: {{{name}: path/to/file.jsonl}} in the eval config."
            ) from error
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    return [spec.to_problem(row, index, source) for index, row in enumerate(raw)]
