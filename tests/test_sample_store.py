"""qalign.sample_store: resume with equal settings, refuse other settings without touching a byte, recover a
torn tail, and keep the chunk seeds that eval and Q# stores were written with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qalign.config import ConfigError
from qalign.sample_store import SampleStore, SettingsMismatch, chunk_seed, read_records

SETTINGS = {"temperature": 1.0, "n": 2, "policy": {"model": "tiny", "dtype": "float32"}}
RESTART = "overwrite: true"


def _fill(path: Path, chunks: range, settings: dict = SETTINGS) -> list[int]:
    """A caller in miniature: one record per (chunk, sample), chunks already stored skipped; returns the
    chunks it had to produce."""
    produced = []
    with SampleStore(path, settings, restart=RESTART, key=lambda r: (r["chunk"], r["sample"])) as store:
        for chunk in chunks:
            if all((chunk, s) in store.rows for s in range(2)):
                continue
            produced.append(chunk)
            store.append([{"chunk": chunk, "sample": s, "seed": chunk_seed("t", chunk)} for s in range(2)])
    return produced


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_equal_settings_resume_and_produce_only_missing_chunks(tmp_path):
    path = tmp_path / "s.jsonl"
    assert _fill(path, range(2)) == [0, 1]
    before = path.read_bytes()
    assert _fill(path, range(4)) == [2, 3]  # 0 and 1 are kept, not redone
    data = path.read_bytes()
    assert data.startswith(before) and len(data.splitlines()) == 8
    assert _fill(path, range(4)) == []
    assert path.read_bytes() == data
    assert json.loads((tmp_path / "s.meta.json").read_text()) == SETTINGS


def test_other_settings_fail_naming_each_differing_key_and_delete_nothing(tmp_path):
    path = tmp_path / "s.jsonl"
    _fill(path, range(2))
    with path.open("ab") as handle:
        handle.write(b'{"chunk": 2, "sam')  # a torn tail too: a refused open must not even cut that
    before = _snapshot(tmp_path)
    other = {"temperature": 0.5, "n": 2, "policy": {"model": "tiny", "dtype": "bfloat16"}, "top_k": 5}
    with pytest.raises(SettingsMismatch) as caught:
        _fill(path, range(4), other)
    message = str(caught.value)
    assert "temperature: 1.0 → 0.5" in message
    assert "policy: {'dtype': 'float32'} → {'dtype': 'bfloat16'}" in message  # only the nested key that moved
    assert "top_k: '(absent)' → 5" in message
    assert "n:" not in message and "model" not in message
    assert message.endswith("To start over: overwrite: true")
    assert set(caught.value.differences) == {"temperature", "policy", "top_k"}
    assert isinstance(caught.value, ConfigError)  # the CLIs print it as one line
    assert _snapshot(tmp_path) == before


def test_records_without_settings_are_refused_untouched(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"chunk": 0, "sample": 0}\n')
    with pytest.raises(ConfigError, match=r"no s\.meta\.json"):
        SampleStore(path, SETTINGS, restart=RESTART)
    assert _snapshot(tmp_path) == {"s.jsonl": b'{"chunk": 0, "sample": 0}\n'}


def test_settings_without_records_give_way(tmp_path):
    # Nothing was paid for under the stored settings (killed before the first chunk): no reason to refuse.
    path = tmp_path / "s.jsonl"
    (tmp_path / "s.meta.json").write_text(json.dumps({"temperature": 9.0}))
    assert _fill(path, range(1)) == [0]
    assert json.loads((tmp_path / "s.meta.json").read_text()) == SETTINGS


def test_torn_tail_is_cut_and_whole_records_kept(tmp_path):
    path = tmp_path / "s.jsonl"
    _fill(path, range(2))
    whole = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(whole[:3]) + whole[3][:7])  # chunk 1 lost its second record mid-write
    assert len(read_records(path)) == 3 and path.read_bytes().endswith(whole[3][:7])  # reading changes nothing
    assert _fill(path, range(2)) == [1]
    lines = path.read_bytes().splitlines(keepends=True)
    assert lines[:3] == whole[:3]  # written before the kill: untouched
    assert [json.loads(line)["chunk"] for line in lines] == [0, 0, 1, 1, 1]  # chunk 1's first record stays
    with SampleStore(path, SETTINGS, restart=RESTART, key=lambda r: (r["chunk"], r["sample"])) as store:
        assert sorted(store.rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert store.rows[(1, 0)] == json.loads(whole[2])  # the first record of a key wins


def test_a_damaged_whole_line_is_an_error_not_a_torn_tail(tmp_path):
    path = tmp_path / "s.jsonl"
    _fill(path, range(1))
    path.write_bytes(b"not json\n" + path.read_bytes())
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"s.jsonl:1 is not valid JSON"):
        SampleStore(path, SETTINGS, restart=RESTART)
    assert _snapshot(tmp_path) == before


def test_overwrite_starts_over(tmp_path):
    path = tmp_path / "s.jsonl"
    _fill(path, range(2))
    other = {**SETTINGS, "temperature": 0.5}
    with SampleStore(path, other, restart=RESTART, overwrite=True) as store:
        assert store.records == []
    assert path.read_bytes() == b"" and json.loads((tmp_path / "s.meta.json").read_text()) == other


def test_chunk_seed_keeps_the_seeds_existing_stores_were_written_with():
    # Values of eval's derive_seed(seed, benchmark, chunk) and Q#'s chunk_seed(seed, iteration, chunk) as they
    # were before this module (commit 344a0a5), so stores written then resume with the same seeds.
    assert chunk_seed(0, "gsm8k", 7) == 1043123644
    assert chunk_seed(3, "math500", 0) == 1480787001
    assert chunk_seed("qsharp", 0, 1, 2) == 354788992
    assert chunk_seed("qsharp", 5, 2, 0) == 1721655242
    seeds = {chunk_seed("probe", 0, "train", chunk) for chunk in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)


def test_records_of_other_problems_are_refused_naming_the_first_and_kept(tmp_path):
    # Same settings, other data: the file behind them was edited (or a hub dataset revised) since the samples.
    path = tmp_path / "s.jsonl"
    with SampleStore(path, SETTINGS, restart=RESTART) as store:
        store.append([{"i": i, "question": f"What is {i} + {i}?", "gold": str(2 * i)} for i in range(3)])
    before = _snapshot(tmp_path)
    same = {i: (f"What is {i} + {i}?", str(2 * i)) for i in range(2)}  # problem 2 is past the limit: unchecked
    with SampleStore(path, SETTINGS, restart=RESTART) as store:
        store.refuse_other_problems(same, index="i")
    for edited in ({**same, 1: ("What is 1 + 1?", "3")}, {**same, 1: ("What is one plus one?", "2")}):
        with SampleStore(path, SETTINGS, restart=RESTART) as store, pytest.raises(ConfigError) as caught:
            store.refuse_other_problems(edited, index="i")
        assert str(caught.value) == (
            f"{path} holds samples of other problems than the data now has (problem 1: stored 'What is 1 + 1?' → "
            f"'2', now {edited[1][0]!r} → {edited[1][1]!r}); no record was changed. To start over: overwrite: true"
        )
    assert _snapshot(tmp_path) == before


def test_a_refusal_shows_where_two_long_problems_differ(tmp_path):
    # Q#'s problems are token ids behind a chat template, alike for their first hundred characters: the error
    # must show the part that changed, not two equal cut-off heads.
    path = tmp_path / "s.jsonl"
    template = list(range(1000, 1040))
    with SampleStore(path, SETTINGS, restart=RESTART) as store:
        store.append([{"i": 0, "ids": [*template, 7, 8]}])
    with SampleStore(path, SETTINGS, restart=RESTART) as store, pytest.raises(ConfigError) as caught:
        store.refuse_other_problems({0: [*template, 9, 8]}, index="i", problem_of=lambda record: record["ids"])
    assert "(problem 0: stored ...1036, 1037, 1038, 1039, 7, 8], now ...1036, 1037, 1038, 1039, 9, 8]);" in str(
        caught.value
    )
    # A long question whose gold changed: the window opens near the end, on the gold.
    question = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May."
    with SampleStore(path, SETTINGS, restart=RESTART) as store:
        store.append([{"i": 1, "question": question, "gold": "72"}])
    with SampleStore(path, SETTINGS, restart=RESTART) as store, pytest.raises(ConfigError) as caught:
        store.refuse_other_problems({1: (question, "73")}, index="i")
    assert "(problem 1: stored ...as many in May.' → '72', now ...as many in May.' → '73');" in str(caught.value)
