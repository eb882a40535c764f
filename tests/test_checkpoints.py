"""Resuming picks a complete checkpoint, and a cut-short one is named, not loaded."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from qalign.checkpoints import checkpoint_problem, latest_complete_checkpoint, resolve_resume, safetensors_problem
from qalign.config import ConfigError


def make_checkpoint(root, step, truncate_to=None):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    weights = folder / "model.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(weights))
    if truncate_to is not None:
        weights.write_bytes(weights.read_bytes()[:truncate_to])
    return folder


def test_a_whole_file_passes_and_a_cut_one_is_measured(tmp_path):
    folder = make_checkpoint(tmp_path, 1)
    file = folder / "model.safetensors"
    assert safetensors_problem(file) is None
    whole = file.stat().st_size
    file.write_bytes(file.read_bytes()[:-10])
    assert safetensors_problem(file) == f"truncated: {whole - 10} bytes of {whole}"
    file.write_bytes(b"\x05\x00")
    assert safetensors_problem(file) == "2 bytes, shorter than the 8-byte header length"


def test_latest_complete_checkpoint_skips_the_one_cut_short(tmp_path, caplog):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 10)
    broken = make_checkpoint(tmp_path, 12, truncate_to=100)
    (tmp_path / "checkpoint-14").mkdir()  # created, nothing written yet
    with caplog.at_level(logging.WARNING, logger="qalign.checkpoints"):
        assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert f"not resuming from checkpoint-12: {broken / 'model.safetensors'}: truncated: 100 bytes of" in caplog.text
    assert "checkpoint-14: " in caplog.text and "trainer_state.json is missing" in caplog.text
    assert resolve_resume("true", tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_resume(None, tmp_path) is None and resolve_resume("false", tmp_path) is None


def test_an_explicit_broken_checkpoint_is_an_error_naming_the_file(tmp_path):
    broken = make_checkpoint(tmp_path, 3, truncate_to=50)
    with pytest.raises(
        ConfigError,
        match=r"resume_from_checkpoint: .*checkpoint-3/model\.safetensors: 50 bytes, shorter than its 64-byte header",
    ):
        resolve_resume(str(broken), tmp_path)
    (broken / "trainer_state.json").write_text("{not json")
    assert "trainer_state.json is unreadable" in checkpoint_problem(broken)


def test_disk_full_is_recognised_whatever_raised_it(tmp_path):
    import shutil

    from qalign.checkpoints import is_disk_full

    assert is_disk_full(OSError(28, "No space left on device"))
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(122, "Disk quota exceeded")
    assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(2, "No such file or directory"))
    assert not is_disk_full(ValueError("bad value"))
    # torch.save names no errno: a failed write counts when the disk has less room than a checkpoint needs.
    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 631360 vs 631252")
    assert not is_disk_full(torn)  # no folder to look at
    assert not is_disk_full(torn, tmp_path) or shutil.disk_usage(tmp_path).free < 16 * 2**20


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: one checkpoint of the tiny model (1.8 MiB) fits, a second does not."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_the_previous_checkpoint_resumes(
    tiny_model_dir, tmp_path, small_disk
):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def train(output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "qalign.train", "--config", "configs/demo.yaml", "--model_name_or_path",
                   str(tiny_model_dir), "--prompt_template", "plain", "--max_steps", "3", "--eval_samples", "0",
                   "--max_completion_length", "8", "--save_steps", "1", "--report_to", "none",
                   "--output_dir", str(output_dir), *extra]  # fmt: skip
        return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)

    full = train(small_disk / "out")
    assert full.returncode == 1, full.stderr[-3000:]
    # One line says so (the trainer's progress bar may still close after it), and no traceback.
    lines = [line for line in full.stderr.splitlines() if line.startswith("qalign: ")]
    assert len(lines) == 1, full.stderr[-3000:]
    assert lines[0].startswith(f"qalign: no space left on the disk of {small_disk / 'out'} (")
    assert lines[0].endswith("--resume_from_checkpoint true continues from checkpoint-1"), lines[0]
    assert "Traceback" not in full.stderr

    # Given room, the same run resumes from the checkpoint written before the disk filled and finishes.
    moved = tmp_path / "out"
    shutil.copytree(small_disk / "out", moved)
    resumed = train(moved, "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resuming from checkpoint-2" in resumed.stderr  # the cut one is named and skipped
    state = json.loads((moved / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]
