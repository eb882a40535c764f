"""Pooling comparison folders over training seeds: the numbers are seeds_interval's on the right matrices, and
folders that cannot be pooled are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qalign.compare.seeds import main
from qalign.compare.stats import seeds_interval

HELDOUT = {"benchmark": "arithmetic", "split": "test", "problems": 4, "n": 2, "seed": 0, "graded": 4}


def write_folder(root: Path, seed: int, scores: dict[str, tuple[list[float], list[float]]], **heldout) -> Path:
    """A finished comparison folder as pooling reads it: report.json alone, one row per method."""
    root.mkdir(parents=True)
    rows = [{"name": name, "seed": None if name == "reference" else seed, "kl_per_token": 0.1 * seed,
             "greedy": {"scores": greedy}, "sampled": {"scores": sampled}}
            for name, (greedy, sampled) in scores.items()]  # fmt: skip
    (root / "report.json").write_text(json.dumps({"heldout": {**HELDOUT, **heldout}, "rows": rows}))
    return root


def test_pooled_accuracies_and_differences_are_seeds_interval_of_each_seeds_scores(tmp_path, capsys):
    ref = ([0, 1, 0, 0], [0.0, 0.5, 0.0, 0.5])
    seed0 = write_folder(tmp_path / "s0", 0, {"reference": ref, "grpo": ([1, 1, 0, 0], [0.5, 1.0, 0.0, 0.5]),
                                              "shiq": ([1, 1, 1, 0], [1.0, 1.0, 0.5, 0.0])})  # fmt: skip
    seed1 = write_folder(tmp_path / "s1", 1, {"reference": ref, "grpo": ([0, 1, 1, 0], [0.0, 1.0, 0.5, 0.5]),
                                              "shiq": ([1, 1, 1, 1], [1.0, 0.5, 1.0, 0.5])})  # fmt: skip
    record = main([str(seed0), str(seed1), "--methods", "grpo,shiq", "--output_dir", str(tmp_path / "out")])

    assert list(record["methods"]) == ["grpo", "shiq"]
    assert record["methods"]["shiq"]["greedy"] == seeds_interval([[1, 1, 1, 0], [1, 1, 1, 1]]).as_dict()
    assert record["methods"]["grpo"]["sampled"]["seed_means"] == [0.5, 0.5]
    assert record["methods"]["grpo"]["kl_per_token"] == [0.0, 0.1]
    (difference,) = record["differences"]
    assert (difference["a"], difference["b"]) == ("shiq", "grpo")  # the later-listed method minus the earlier
    expected = seeds_interval([[0, 0, 1, 0], [1, 0, 0, 1]]).as_dict()
    assert difference["greedy"] == expected and difference["greedy"]["estimate"] == 0.375
    assert record["seeds"] == {"grpo": [0, 1], "shiq": [0, 1]}
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"seeds.md", "seeds.json", "seeds.png"}
    markdown = (out / "seeds.md").read_text()
    assert "| shiq − grpo | +0.250 / +0.500 |" in markdown and "Training seeds, in folder order: 0 / 1." in markdown
    assert "2 methods over 2 seeds" in capsys.readouterr().out

    # every method finished in both folders, in the report's order, when --methods is left out
    assert list(main([str(seed0), str(seed1)])["methods"]) == ["reference", "grpo", "shiq"]


def test_folders_that_cannot_be_pooled_are_refused_naming_why(tmp_path):
    scores = {"grpo": ([1, 0, 1, 0], [0.5, 0.0, 1.0, 0.0])}
    seed0 = write_folder(tmp_path / "s0", 0, scores)
    same_seed = write_folder(tmp_path / "again", 0, scores)
    other_problems = write_folder(tmp_path / "s1", 1, scores, problems=8)
    before_scores = write_folder(tmp_path / "old", 3, scores)
    report = json.loads((before_scores / "report.json").read_text())
    report["rows"][0]["greedy"] = {"estimate": 0.5, "low": 0.2, "high": 0.8}  # a report from before 2026-12-07
    (before_scores / "report.json").write_text(json.dumps(report))
    for argv, message in (
        ([seed0, same_seed], "same seed 0"),
        ([seed0, other_problems], "heldout problems differ"),
        ([seed0, write_folder(tmp_path / "s2", 2, scores), "--methods", "shiq"], "method 'shiq' has no result"),
        ([seed0], "at least two comparison folders"),
        ([seed0, tmp_path / "missing"], "report.json does not exist"),
        ([seed0, before_scores], "holds no per-problem scores .* run its comparison again"),
    ):
        with pytest.raises(SystemExit, match=message):
            main([str(a) for a in argv])
