"""Atomic writes: a file or folder is either complete or absent, never half-written.

Everything qalign writes that a later run reads back (caches, resumable sample stores, settings files,
rollout shards, converted models, reports) goes through here, so a process killed mid-write leaves at
most a temporary ``.<name>.<pid>.tmp`` beside the target, which the next write replaces.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A path in the same folder as ``path`` (so the final rename stays on one filesystem), unique per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Write to the yielded temporary path (a file or a folder); on success it replaces ``path`` in one
    rename, on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
