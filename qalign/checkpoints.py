"""Which checkpoint to resume from, and whether it is whole — without torch.

A run killed while it wrote ``checkpoint-N`` (or a disk that filled up) leaves a folder whose newest files
are cut short. transformers' "latest checkpoint" is the highest step number, so ``resume_from_checkpoint:
true`` would load the broken one and fail with a traceback that names no file. Here a checkpoint counts as
complete when its ``trainer_state.json`` parses and every ``*.safetensors`` file in it is as long as its own
header says (the header lists each tensor's byte range; a cut file is shorter than the last range's end).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path

from qalign.config import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file is not whole (truncated, bad header), or None when it is."""
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{size} bytes, shorter than the 8-byte header length"
            (header_length,) = struct.unpack("<Q", prefix)
            if 8 + header_length > size:
                return f"{size} bytes, shorter than its {header_length}-byte header"
            header = json.loads(handle.read(header_length))
    except (OSError, ValueError) as error:
        return f"unreadable header ({error})"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} bytes of {expected}"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (naming the file), or None when it is."""
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        return f"{state} is missing"
    except (OSError, ValueError) as error:
        return f"{state} is unreadable ({error})"
    for file in sorted(folder.rglob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem is not None:
            return f"{file}: {problem}"
    return None


def check_checkpoint(path: str | Path) -> None:
    """ConfigError naming the bad file when the checkpoint at ``path`` is incomplete or corrupt."""
    problem = checkpoint_problem(Path(path))
    if problem is not None:
        raise ConfigError(f"resume_from_checkpoint: {problem}; give an earlier checkpoint-<step> folder, or true "
                          f"for the latest complete one")  # fmt: skip


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step ``checkpoint-N`` in ``output_dir`` that is complete; skipped ones are logged."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = sorted(
        (int(match.group(1)), child)
        for child in root.iterdir()
        if child.is_dir() and (match := CHECKPOINT.match(child.name))
    )
    for _, folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("not resuming from %s: %s", folder.name, problem)
    return None


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> str | None:
    """``resume_from_checkpoint`` as a checked folder: a given folder must be complete; true means the latest
    complete checkpoint in ``output_dir`` (None, i.e. start from scratch, when there is none)."""
    if value is None or value is False or str(value).strip().lower() in ("false", "none", "null", ""):
        return None
    if value is True or str(value).strip().lower() == "true":
        latest = latest_complete_checkpoint(output_dir)
        if latest is None:
            logger.warning("resume_from_checkpoint: no complete checkpoint in %s; starting from scratch", output_dir)
        return None if latest is None else str(latest)
    check_checkpoint(value)
    return str(value)
