"""Load a split of a math dataset by name: bundled task, local file/folder, or hub id.

Everything comes out in one schema, ``{"question": str, "answer": str}`` (plus the source's
other columns), so trainers, eval and collection never care where the data came from. A
conversational dataset (TRL's format, ``qalign.data.formats``) also gets ``messages``, the prompt turns.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qalign.config import ConfigError

if TYPE_CHECKING:  # datasets is imported where data is loaded: config validation must stay fast
    from datasets import Dataset

BUNDLED = ("arithmetic",)
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
QUESTION_COLUMNS = ("question", "problem", "prompt", "query", "input")
ANSWER_COLUMNS = ("answer", "final_answer", "solution", "target", "output")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(LOCAL_SUFFIXES) or Path(name).exists()


def check_dataset_name(name: str) -> None:
    """Fail fast (before any model loads) on a local path that does not exist."""
    if name in BUNDLED or not _looks_local(name):
        return  # a hub id is checked when it loads
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"dataset_name {name!r}: no such file or folder. Give a bundled task ({', '.join(BUNDLED)}), "
            f"a hub id such as 'openai/gsm8k', a {'/'.join(LOCAL_SUFFIXES)} file, or a folder of <split> files."
        )


def _local_file(path: Path, split: str) -> Path:
    if path.is_file():
        return path
    candidates = [path / f"{split}{suffix}" for suffix in LOCAL_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"dataset folder {str(path)!r} has no file for split {split!r}: looked for "
        f"{', '.join(c.name for c in candidates)}"
    )


def load_raw(name: str, split: str, config: str | None = None) -> Dataset:
    """The split as stored, before column mapping."""
    from datasets import Dataset

    if name == "arithmetic":
        from qalign.data import arithmetic

        return Dataset.from_list(arithmetic.generate(split))
    if _looks_local(name):
        check_dataset_name(name)
        file = _local_file(Path(name).expanduser(), split)
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}[file.suffix]
        return _load_file(file, kind)
    from datasets import load_dataset

    return load_dataset(name, config, split=split)


def _load_file(file: Path, kind: str) -> Dataset:
    from datasets import load_dataset

    return load_dataset(kind, data_files=str(file), split="train")


def load_math_split(
    name: str,
    split: str,
    config: str | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
    limit: int | None = None,
) -> Dataset:
    """A split mapped to ``question``/``answer`` columns (GSM8K's ``#### n`` answers are kept whole:
    the verifier extracts the final answer from them)."""
    raw = load_raw(name, split, config)
    if len(raw) == 0:
        raise ConfigError(f"dataset {name!r}: split {split!r} has no rows")
    from qalign.data.formats import conversational_column, conversational_row

    column = conversational_column(raw[0])
    if column is not None:  # TRL's conversational format: the messages are the prompt
        if limit is not None:
            raw = raw.select(range(min(limit, len(raw))))
        answer = answer_column or next((c for c in ANSWER_COLUMNS if c in raw.column_names), None)
        if answer_column is not None and answer_column not in raw.column_names:
            raise ConfigError(f"answer_column={answer_column!r} is not a column of dataset {name!r}; "
                              f"columns: {raw.column_names}")  # fmt: skip
        rows = raw.map(lambda row: conversational_row(row, column, answer), remove_columns=raw.column_names)
        if rows.features["answer"].dtype != "string":  # a numeric answer column keeps its type through map
            from datasets import Value

            rows = rows.cast_column("answer", Value("string"))
        return rows.select_columns(["question", "answer", "messages"])
    question = _pick_column(raw, question_column, QUESTION_COLUMNS, "question_column", name)
    answer = _pick_column(raw, answer_column, ANSWER_COLUMNS, "answer_column", name)
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    renames = {old: new for old, new in ((question, "question"), (answer, "answer")) if old != new}
    clashing = [new for new in renames.values() if new in raw.column_names]
    raw = raw.remove_columns(clashing).rename_columns(renames) if renames else raw
    if raw.features["answer"].dtype != "string":  # numeric golds (AIME) become strings, as the verifier expects
        from datasets import Value

        raw = raw.cast_column("answer", Value("string"))
    return raw


def _pick_column(dataset: Dataset, chosen: str | None, candidates: tuple[str, ...], key: str, name: str) -> str:
    columns = dataset.column_names
    if chosen is not None:
        if chosen not in columns:
            raise ConfigError(f"{key}={chosen!r} is not a column of dataset {name!r}; columns: {columns}")
        return chosen
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ConfigError(f"dataset {name!r} has none of the columns {list(candidates)}; set {key} to one of {columns}")
