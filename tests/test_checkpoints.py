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
