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


# ----------------------------------------------------------------------------- a full disk

# How a full disk reads by the time it reaches the trainer: Python's OSError (errno 28), safetensors' error
# (Rust's StorageFull), torch.save's RuntimeErrors, which name no errno ("file write failed", "iostream
# error", "unexpected pos N vs M" when the zip writer's file came up short).
_DISK_FULL = ("No space left on device", "StorageFull", "Disk quota exceeded")
_WRITE_FAILED = ("file write failed", "iostream error", "unexpected pos")
ENOSPC, EDQUOT = 28, 122


def is_disk_full(error: BaseException, output_dir: str | Path | None = None, latest: Path | None = None) -> bool:
    """True when ``error`` (or one it was raised from) is a write that failed for lack of space: an errno or
    message that says so, or — torch's writers say only that a write failed — such a failure while the disk
    of ``output_dir`` has less room than one more checkpoint needs."""
    seen: set[int] = set()
    write_failed = False
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (ENOSPC, EDQUOT):
            return True
        if any(marker in str(error) for marker in _DISK_FULL):
            return True
        write_failed = write_failed or any(marker in str(error) for marker in _WRITE_FAILED)
        error = error.__cause__ or error.__context__
    # ``latest``: the output_dir's latest complete checkpoint, found once by the caller (its search logs).
    return write_failed and output_dir is not None and _free_bytes(output_dir) < _checkpoint_bytes(latest)


def _free_bytes(output_dir: str | Path) -> int:
    import shutil

    root = Path(output_dir)
    try:
        return shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        return 1 << 62


def _checkpoint_bytes(latest: Path | None) -> int:
    """The size of the latest complete checkpoint (what the next one needs), at least 16 MiB."""
    size = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file()) if latest is not None else 0
    return max(size, 16 * 2**20)


def disk_full_message(output_dir: str | Path, latest: Path | None) -> str:
    """One line: the disk is full, how much is free, and which checkpoint (``latest``) a rerun with resume loads."""
    root = Path(output_dir)
    free = f"{_free_bytes(root) / 2**20:.1f} MiB free"
    resume = (f"--resume_from_checkpoint true continues from {latest.name}" if latest is not None
              else "no complete checkpoint yet: the rerun starts over")  # fmt: skip
    return f"qalign: no space left on the disk of {root} ({free}) while writing; free some, then rerun: {resume}"
