"""qalign.atomic: a target is either the old complete one or the new complete one."""

from __future__ import annotations

import pytest

from qalign.atomic import atomic_path, write_atomic


def test_write_atomic_replaces_the_whole_file(tmp_path):
    target = tmp_path / "meta.json"
    write_atomic(target, "old")
    write_atomic(target, "néw")
    assert target.read_text(encoding="utf-8") == "néw"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temporary left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "rows.jsonl"
    target.write_text("complete\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new cont")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_a_folder_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["model"]
