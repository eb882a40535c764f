"""qalign.collect: the rollout format, resume after a crash (in process, and a real SIGKILL'd
subprocess), refusal to mix settings, and a resumed dataset equal to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qalign.collect import CollectArguments, collect, parse_collect_args
from qalign.data.rollouts import RolloutWriter, load_rollouts, shard_files
from qalign.rollout.config import RolloutArguments
from qalign.rollout.hf import HFEngine
from tests.trainers.helpers import DENSE_REWARD  # cheap to grade, and nonzero on a random model's text

REPO_ROOT = Path(__file__).resolve().parent.parent


def tiny_args(model_dir, output_dir, **overrides) -> CollectArguments:
    kwargs = dict(model_name_or_path=str(model_dir), dataset_name="arithmetic", prompt_template="plain",
                  reward_funcs=[DENSE_REWARD], max_prompts=6, num_samples=2, max_tokens=6,
                  prompts_per_shard=2, output_dir=str(output_dir), seed=0)  # fmt: skip
    kwargs.update(overrides)
    return CollectArguments(**kwargs)


def collect_hf(args: CollectArguments):
    """``collect`` on HF generate (its default is auto, which picks vLLM where installed)."""
    return collect(args, RolloutArguments(rollout_backend="hf"))


def rows_by_key(folder) -> dict[tuple[int, int], dict]:
    rows = load_rollouts(str(folder)).to_list()
    keys = [(r["prompt_index"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "a prompt was written twice"
    return dict(zip(keys, rows))


def test_rollout_rows_hold_everything_the_trainers_need(tiny_model_dir, tmp_path):
    collect_hf(tiny_args(tiny_model_dir, tmp_path / "data"))
    rows = rows_by_key(tmp_path / "data")
    assert sorted(rows) == [(p, s) for p in range(6) for s in range(2)]
    for row in rows.values():
        n = len(row["completion_ids"])
        assert 0 < n <= 6
        for column in ("action_mask", "rewards", "ref_logprobs", "ref_lse", "behavior_logprobs"):
            assert len(row[column]) == n, column
        assert row["rewards"][:-1] == [0.0] * (n - 1) and row["rewards"][-1] == row["reward"]
        # Sampled at temperature 1 from the reference itself: the sampler's log-probs are π_ref's
        # (KV-cached generation vs one full forward: float error only).
        assert row["behavior_logprobs"] == pytest.approx(row["ref_logprobs"], abs=1e-4)


def test_killed_collection_resumes_without_resampling(tiny_model_dir, tmp_path, monkeypatch):
    generated: list[list[int]] = []
    original_generate, original_write = HFEngine.generate, RolloutWriter.write

    def recording_generate(self, prompts, sampling):
        generated.append([len(p) for p in prompts])
        return original_generate(self, prompts, sampling)

    def crash_after_first_shard(self, rows):
        original_write(self, rows)
        raise KeyboardInterrupt("killed after the first shard")

    monkeypatch.setattr(HFEngine, "generate", recording_generate)
    monkeypatch.setattr(RolloutWriter, "write", crash_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        collect_hf(tiny_args(tiny_model_dir, tmp_path / "run"))
    first = shard_files(tmp_path / "run")
    assert len(first) == 1
    first_bytes = first[0].read_bytes()
    (tmp_path / "run" / ".shard-00001.tmp").write_bytes(b"half-written by the killed run")

    monkeypatch.setattr(RolloutWriter, "write", original_write)
    generated.clear()
    collect_hf(tiny_args(tiny_model_dir, tmp_path / "run"))
    assert len(generated) == 2  # the two missing shards only, never the written one
    assert first[0].read_bytes() == first_bytes
    assert not list((tmp_path / "run").glob(".shard-*.tmp"))

    collect_hf(tiny_args(tiny_model_dir, tmp_path / "full"))  # uninterrupted, for comparison
    resumed, full = rows_by_key(tmp_path / "run"), rows_by_key(tmp_path / "full")
    assert resumed.keys() == full.keys()
    for key in full:
        assert resumed[key]["completion_ids"] == full[key]["completion_ids"], key
        assert resumed[key]["reward"] == full[key]["reward"]

    generated.clear()
    collect_hf(tiny_args(tiny_model_dir, tmp_path / "run"))  # complete: nothing to do, no model loaded
    assert generated == []
    collect_hf(tiny_args(tiny_model_dir, tmp_path / "run", max_prompts=8))  # extending samples only the new prompts
    assert len(generated) == 1 and len(rows_by_key(tmp_path / "run")) == 16


def test_resume_refuses_different_settings(tiny_model_dir, tmp_path):
    collect_hf(tiny_args(tiny_model_dir, tmp_path / "data", max_prompts=2))
    with pytest.raises(ValueError, match="temperature"):
        collect_hf(tiny_args(tiny_model_dir, tmp_path / "data", max_prompts=2, temperature=0.7))


def test_config_parsing_yaml_sections_and_typos(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("num_samples: 3\nreward_funcs: [accuracy]\nrollout:\n  backend: hf\n")
    args, rollout = parse_collect_args(["--config", str(config), "--max_tokens", "7"], output_dir="x")
    assert (args.num_samples, args.max_tokens, args.output_dir, rollout.rollout_backend) == (3, 7, "x", "hf")
    from qalign.config import ConfigError

    with pytest.raises(ConfigError, match="num_samples"):
        parse_collect_args(["--config", str(config), "--num_sample", "2"])


@pytest.mark.slow
def test_sigkilled_subprocess_resumes(tiny_model_dir, tmp_path):
    """A real `python -m qalign.collect` killed with SIGKILL mid-run, then started again."""
    import yaml

    out = tmp_path / "data"
    total = 12
    config = tmp_path / "collect.yaml"
    config.write_text(yaml.safe_dump(dict(
        model_name_or_path=str(tiny_model_dir), dataset_name="arithmetic", prompt_template="plain",
        reward_funcs=[DENSE_REWARD], max_prompts=total, num_samples=2, max_tokens=16,
        prompts_per_shard=1, output_dir=str(out), seed=0, rollout_backend="hf",
    )))  # fmt: skip
    command = [sys.executable, "-m", "qalign.collect", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(shard_files(out)) < 1 and time.time() < deadline and process.poll() is None:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    written = {path: path.read_bytes() for path in shard_files(out)}
    assert 1 <= len(written) < total, "the kill must land mid-run"

    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"({len(written)} already there)" in result.stderr
    for path, content in written.items():
        assert path.read_bytes() == content  # shards written before the kill are never rewritten
    rows = rows_by_key(out)
    assert sorted(rows) == [(p, s) for p in range(total) for s in range(2)]
