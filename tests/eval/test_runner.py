"""The eval loop with a scripted policy: rows, resume, seeds, reports (no model needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qalign.eval import runner
from qalign.eval.benchmarks import load_benchmark
from qalign.eval.config import ConfigError, EvalArguments
from qalign.eval.runner import derive_seed, engine_policy_description, run_eval
from qalign.reward import grade
from tests.eval.helpers import ScriptedPolicy

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "benchmarks"


def _args(out: Path, **overrides) -> EvalArguments:
    settings = dict(
        benchmarks=["arithmetic"],
        limit=6,
        n=2,
        temperature=1.0,
        output_dir=str(out),
        problems_per_call=2,
        show_progress=False,
    )
    settings.update(overrides)
    return EvalArguments(**settings)


def _rows(out: Path, name: str = "arithmetic") -> list[dict]:
    return [json.loads(line) for line in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]


def test_writes_one_row_per_problem_and_sample_and_reports(tmp_path, capsys):
    summary = run_eval(_args(tmp_path), ScriptedPolicy())
    rows = _rows(tmp_path)
    assert sorted((r["index"], r["sample"]) for r in rows) == [(i, s) for i in range(6) for s in range(2)]
    from qalign.data.arithmetic import generate

    golds = [row["answer"] for row in generate("test")[:6]]
    for row in rows:
        assert row["gold"] == golds[row["index"]]
        assert row["correct"] == grade(row["completion"], row["gold"])
        assert row["seed"] == derive_seed(0, "arithmetic", row["index"] // 2)
        assert row["finish_reason"] == "stop" and row["completion_tokens"] >= 1
    result = summary["benchmarks"]["arithmetic"]
    assert result["problems"] == 6 and result["n"] == 2 and result["samples"] == 12
    assert result["mean@n"] == pytest.approx(sum(r["correct"] for r in rows) / 12)
    assert result["pass@k"]["1"] == pytest.approx(result["mean@n"])
    solved = {r["index"] for r in rows if r["correct"]}
    assert result["pass@k"]["2"] == pytest.approx(len(solved) / 6)
    assert result["answered"] == pytest.approx(sum(r["extracted"] is not None for r in rows) / 12)
    assert summary["sampling"]["temperature"] == 1.0 and summary["sampling"]["seed"] == 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "| arithmetic | 6 | 2 |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (
        f"arithmetic: pass@1 {result['pass@k']['1']:.3f} pass@2 {result['pass@k']['2']:.3f} "
        f"maj@2 {result['maj@k']['2']:.3f} (n=2, 6 problems)"
    )


def test_resume_after_a_torn_write_regenerates_only_missing_rows(tmp_path):
    reference = tmp_path / "reference"
    run_eval(_args(reference), ScriptedPolicy())

    resumed = tmp_path / "resumed"
    run_eval(_args(resumed), ScriptedPolicy())
    samples = resumed / "samples" / "arithmetic.jsonl"
    lines = samples.read_bytes().splitlines(keepends=True)
    # Keep 3 whole rows (chunk 0 = problems 0,1 has 4 rows: one is missing) and half of the next.
    kept = b"".join(lines[:3])
    samples.write_bytes(kept + lines[3][:20])
    (resumed / "summary.json").unlink()

    policy = ScriptedPolicy()
    run_eval(_args(resumed), policy)
    # Chunk 0 (partial) is sampled again for its one missing row; chunks 1 and 2 were never written.
    assert [seed for _, seed in policy.calls] == [derive_seed(0, "arithmetic", c) for c in (0, 1, 2)]
    data = samples.read_bytes()
    assert data.startswith(kept)  # rows written before the "kill" are untouched
    assert len(data.splitlines()) == 12
    key = lambda r: (r["index"], r["sample"])
    assert sorted(_rows(resumed), key=key) == sorted(_rows(reference), key=key)
    assert (resumed / "summary.json").read_bytes() == (reference / "summary.json").read_bytes()


def test_resume_with_a_larger_limit_matches_one_run(tmp_path):
    run_eval(_args(tmp_path / "full", limit=5, problems_per_call=1), ScriptedPolicy())
    run_eval(_args(tmp_path / "parts", limit=2, problems_per_call=1), ScriptedPolicy())
    policy = ScriptedPolicy()
    run_eval(_args(tmp_path / "parts", limit=5, problems_per_call=1), policy)
    assert len(policy.calls) == 3  # problems 2, 3, 4 only
    assert (tmp_path / "parts" / "summary.json").read_bytes() == (tmp_path / "full" / "summary.json").read_bytes()


def test_a_finished_run_loads_no_model(tmp_path, monkeypatch):
    args = _args(tmp_path)
    run_eval(args, ScriptedPolicy(description=engine_policy_description(args)))
    first = (tmp_path / "summary.json").read_bytes()

    def no_model(_args):
        raise AssertionError("load_policy must not run when every row is present")

    monkeypatch.setattr(runner, "load_policy", no_model)
    run_eval(args)
    assert (tmp_path / "summary.json").read_bytes() == first


def test_resume_with_other_settings_is_refused_unless_overwrite(tmp_path):
    run_eval(_args(tmp_path), ScriptedPolicy())
    with pytest.raises(ConfigError, match=r"other settings \(temperature: 1\.0 → 0\.5\)"):
        run_eval(_args(tmp_path, temperature=0.5), ScriptedPolicy())
    with pytest.raises(ConfigError, match=r"policy: \{'kind': 'scripted'\} → \{'kind': 'other'\}"):
        run_eval(_args(tmp_path), ScriptedPolicy(description={"kind": "other"}))
    policy = ScriptedPolicy()
    run_eval(_args(tmp_path, temperature=0.5, overwrite=True), policy)
    assert len(policy.calls) == 3 and len(_rows(tmp_path)) == 12
    meta = json.loads((tmp_path / "samples" / "arithmetic.meta.json").read_text())
    assert meta["temperature"] == 0.5


def test_a_refused_resume_names_every_differing_key_and_deletes_nothing(tmp_path):
    run_eval(_args(tmp_path, limit=4), ScriptedPolicy())
    samples = tmp_path / "samples"
    before = {p.name: p.read_bytes() for p in samples.iterdir()}
    with pytest.raises(ConfigError, match=r"\(n: 2 → 3, top_p: 1\.0 → 0\.9\).*overwrite: true"):
        run_eval(_args(tmp_path, limit=6, n=3, top_p=0.9), ScriptedPolicy())
    assert {p.name: p.read_bytes() for p in samples.iterdir()} == before
    policy = ScriptedPolicy()
    run_eval(_args(tmp_path, limit=6), policy)  # the stored settings again: only the missing chunk is sampled
    assert [seed for _, seed in policy.calls] == [derive_seed(0, "arithmetic", 2)]
    assert (samples / "arithmetic.jsonl").read_bytes().startswith(before["arithmetic.jsonl"])


def test_resume_on_an_edited_data_file_is_refused_and_keeps_the_samples(tmp_path):
    # The settings name the file, not what is in it: the stored rows answer the problems they were sampled for.
    data = tmp_path / "gsm8k.jsonl"
    shutil.copy(FIXTURES / "gsm8k.jsonl", data)
    out = tmp_path / "run"
    args = _args(out, benchmarks=["gsm8k"], data_files={"gsm8k": str(data)})
    run_eval(args, ScriptedPolicy())
    before = (out / "samples" / "gsm8k.jsonl").read_bytes()
    lines = data.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["answer"] = edited["answer"].replace("#### 300", "#### 301")
    data.write_text("\n".join([lines[0], json.dumps(edited), lines[2]]) + "\n")
    with pytest.raises(
        ConfigError,
        match=r"gsm8k\.jsonl holds samples of other problems than the data now has "
        r"\(problem 1: .* → '300', now .* → '301'\); .*overwrite: true",
    ):
        run_eval(args, ScriptedPolicy())
    assert (out / "samples" / "gsm8k.jsonl").read_bytes() == before
    run_eval(_args(out, benchmarks=["gsm8k"], data_files={"gsm8k": str(data)}, overwrite=True), ScriptedPolicy())
    assert [row["gold"] for row in _rows(out, "gsm8k")[::2]] == [p.answer for p in load_benchmark("gsm8k", data)]
    assert _rows(out, "gsm8k")[2]["gold"] == "301"


def test_samples_do_not_depend_on_other_chunks(tmp_path):
    # Problems 0-3 come out the same whether or not problems 4-5 are evaluated after them.
    run_eval(_args(tmp_path / "a", limit=4), ScriptedPolicy())
    run_eval(_args(tmp_path / "b", limit=6), ScriptedPolicy())
    first = [r for r in _rows(tmp_path / "b") if r["index"] < 4]
    assert _rows(tmp_path / "a") == first


def test_derive_seed_is_stable_and_distinct():
    seeds = {derive_seed(0, "gsm8k", chunk) for chunk in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(0, "gsm8k", 7) == derive_seed(0, "gsm8k", 7)
    assert derive_seed(0, "gsm8k", 7) != derive_seed(1, "gsm8k", 7) != derive_seed(0, "math500", 7)


def test_text_only_policies_are_accepted(tmp_path):
    summary = run_eval(_args(tmp_path), ScriptedPolicy(as_text=True))
    rows = _rows(tmp_path)
    assert all(r["finish_reason"] is None and r["completion_tokens"] is None for r in rows)
    assert summary["benchmarks"]["arithmetic"]["mean_completion_tokens"] is None


def test_a_policy_returning_too_few_samples_fails(tmp_path):
    class Short(ScriptedPolicy):
        def sample(self, prompts, sampling):
            return [samples[:1] for samples in super().sample(prompts, sampling)]

    with pytest.raises(RuntimeError, match=r"returned \[1, 1\] completions for 2 prompts x n=2"):
        run_eval(_args(tmp_path), Short())


def test_corrupt_row_in_the_middle_is_reported(tmp_path):
    run_eval(_args(tmp_path), ScriptedPolicy())
    samples = tmp_path / "samples" / "arithmetic.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:2]) + "{oops\n" + "".join(lines[2:]))
    with pytest.raises(ValueError, match=r"arithmetic.jsonl:3 is not valid JSON"):
        run_eval(_args(tmp_path), ScriptedPolicy())
