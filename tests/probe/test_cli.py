"""``python -m qalign.probe`` end to end on the tiny Llama (HF sampler, hidden-state embedder), resume,
and config errors; the best-of-k policy as an engine and as an eval policy."""

from __future__ import annotations

import json

import pytest
import torch

from qalign.probe.__main__ import main
from qalign.probe.config import ConfigError, parse_probe_args
from tests.tensorboard_events import read_scalars


def cli_args(model_dir, out, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--num_train_prompts", "4", "--num_test_prompts", "3",
        "--samples_per_prompt", "4", "--max_tokens", "6", "--probe.epochs", "5",
        "--k_values", "1", "2", "4", "--betas", "0", "0.5", "--eval_shuffles", "2", "--output_dir", str(out),
        "--embedder.layer", "1", *extra,
    ]  # fmt: skip


def test_cli_runs_end_to_end_and_resumes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(cli_args(tiny_model_dir, out, "--report_to", "tensorboard")) == 0
    printed = capsys.readouterr().out
    assert "| k | p0 | mse | ce | pg | bt | oracle |" in printed and "| 4 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["train"] == {**results["data"]["train"], "prompts": 4, "samples": 16, "dim": 64}
    table = results["tables"]["0.0"]["test"]
    assert sorted(table, key=int) == ["1", "2", "4"]
    assert table["1"]["pg"] == pytest.approx(table["1"]["p0"])  # π_{θ,1} = p0 whatever the probe
    assert all(table[k]["oracle"] >= table[k]["mse"] - 1e-9 for k in table)
    # TensorBoard got the k-tables, equal to results.json's.
    scalars = read_scalars(out / "runs")
    assert scalars["test/beta0.0/pg@k4"] == [(0, pytest.approx(table["4"]["pg"]))]
    assert scalars["train/beta0.5/oracle@k2"] == [(0, pytest.approx(results["tables"]["0.5"]["train"]["2"]["oracle"]))]
    for name in ("results.md", "reward_vs_k.png", "probe_pg.pt", "samples_train.jsonl", "features_test.pt"):
        assert (out / name).is_file(), name
    rows = (out / "samples_train.jsonl").read_text().splitlines()
    assert len(rows) == 16 and {"prompt", "completion", "reward", "completion_ids"} <= set(json.loads(rows[0]))

    # Resume: nothing is sampled again (the sampler would fail), and the probes train the same.
    from qalign.probe import pipeline

    monkeypatch.setattr(pipeline.Resources, "build_sampler", lambda self: pytest.fail("sampled again"))
    assert main(cli_args(tiny_model_dir, out)) == 0
    assert json.loads((out / "results.json").read_text())["tables"] == results["tables"]

    # A run killed mid-write: a torn line and a partial prompt are dropped and only that prompt is redone.
    monkeypatch.undo()
    (out / "samples_train.jsonl").write_text("\n".join(rows[:14]) + "\n" + rows[14][:20])
    assert main(cli_args(tiny_model_dir, out)) == 0
    redone = [json.loads(line) for line in (out / "samples_train.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in redone] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert redone[:12] == [json.loads(line) for line in rows[:12]]


def test_other_sampling_settings_are_refused_until_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(tiny_model_dir, out)) == 0
    before = {p.name: p.read_bytes() for p in out.glob("samples_*")}
    # Before, the probe silently deleted these samples and drew new ones; now it stops and says why.
    with pytest.raises(SystemExit) as exit_:
        main(cli_args(tiny_model_dir, out, "--temperature", "0.7", "--max_tokens", "5"))
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "(max_tokens: 6 → 5, temperature: 1.0 → 0.7)" in error and "overwrite: true" in error
    assert {p.name: p.read_bytes() for p in out.glob("samples_*")} == before
    assert main(cli_args(tiny_model_dir, out, "--temperature", "0.7", "--max_tokens", "5", "--overwrite")) == 0
    assert json.loads((out / "samples_train.meta.json").read_text())["temperature"] == 0.7
    assert len((out / "samples_train.jsonl").read_text().splitlines()) == 16


def test_held_out_problems_from_a_file(tiny_model_dir, tmp_path, capsys):
    """``test_data_file``: the k-table is computed on the file's problems (a validation split carved from train,
    say), and the sample cache records the file, so samples of another file are not reused for it."""
    problems = [{"question": f"What is {a} + {a}?", "answer": str(2 * a)} for a in (11, 12, 13)]
    file = tmp_path / "validation.jsonl"
    file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    out = tmp_path / "run"
    assert main(cli_args(tiny_model_dir, out, "--test_data_file", str(file))) == 0
    rows = [json.loads(line) for line in (out / "samples_test.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["question"], r["gold"]) for r in rows[::4]] == [
        (i, p["question"], p["answer"]) for i, p in enumerate(problems)
    ]
    assert json.loads((out / "samples_test.meta.json").read_text())["data_file"] == str(file.resolve())
    assert "data_file" not in json.loads((out / "samples_train.meta.json").read_text())
    assert json.loads((out / "results.json").read_text())["data"]["test"]["prompts"] == 3
    # The cache records the file's path; problems edited since are refused, not graded with the old samples.
    samples = (out / "samples_test.jsonl").read_bytes()
    problems[2]["answer"] = "27"
    file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    with pytest.raises(SystemExit) as exit_:
        main(cli_args(tiny_model_dir, out, "--test_data_file", str(file)))
    assert exit_.value.code == 2
    assert (
        "holds samples of other problems than the data now has (problem 2: stored 'What is 13 + 13?' → '26', "
        "now 'What is 13 + 13?' → '27')" in capsys.readouterr().err
    )
    assert (out / "samples_test.jsonl").read_bytes() == samples
    with pytest.raises(ConfigError, match=r"test_data_file '.*missing.jsonl' is not a .jsonl/.json/.parquet/.csv file"):
        parse_probe_args(["--test_data_file", str(tmp_path / "missing.jsonl")])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'samples_per_prompt'"):
        parse_probe_args(["--samples_per_promt", "4"])
    with pytest.raises(ConfigError, match="k_values"):
        parse_probe_args(["--samples_per_prompt", "4", "--k_values", "8"])
    with pytest.raises(ConfigError, match="base_url"):
        parse_probe_args(["--embedder.kind", "openai"])
    with pytest.raises(ConfigError, match="losses"):
        parse_probe_args(["--losses", "mse", "dpo"])
    config = tmp_path / "c.yaml"
    config.write_text(
        "embedder:\n  kind: openai\n  base_url: http://127.0.0.1:1/v1\n  model: m\n  api_key_env: MY_KEY\n"
    )
    args = parse_probe_args(["--config", str(config), "--betas", "[0, 0.1]"])
    assert (args.embedder_kind, args.embedder_api_key_env) == ("openai", "MY_KEY")
    assert (args.betas, args.ks) == ([0.0, 0.1], [1, 2, 4, 8])


def test_demo_config_parses():
    from pathlib import Path

    args = parse_probe_args(["--config", str(Path(__file__).parents[2] / "configs" / "probe_demo.yaml")])
    assert args.model_name_or_path == "smollm2-135m-instruct" and max(args.ks) <= args.samples_per_prompt


def test_best_of_k_policy_is_an_engine_and_an_eval_policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qalign.probe.embed_local import HiddenStateEmbedder
    from qalign.probe.models import Probe
    from qalign.probe.policy import BestOfKPolicy
    from qalign.probe.sampling import EngineSampler
    from qalign.rollout.base import RolloutEngine, SamplingConfig
    from qalign.rollout.hf import HFEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    embedder = HiddenStateEmbedder(model, tokenizer)
    torch.manual_seed(0)
    probe = Probe(model.config.hidden_size)
    policy = BestOfKPolicy(
        EngineSampler(HFEngine(model, tokenizer), tokenizer), embedder, probe, k=4, tokenizer=tokenizer
    )
    assert isinstance(policy, RolloutEngine)
    try:
        from qalign.eval.runner import Policy

        assert isinstance(policy, Policy)
    except ImportError:  # the eval package is another engineer's; the protocol check is a bonus
        pass

    prompts = [tokenizer("What is 2 + 3?")["input_ids"], tokenizer("What is 9 - 4?")["input_ids"]]
    sampling = SamplingConfig(n=2, max_tokens=5, seed=1)
    chosen = policy.generate(prompts, sampling)
    assert [len(row) for row in chosen] == [2, 2]
    for row, selections in zip(chosen, policy.last_selections):
        for completion, selection in zip(row, selections):
            assert len(selection.candidates) == 4
            assert selection.chosen == int(selection.q.argmax())  # β = 0: the probe's best of 4
            assert completion is selection.candidates[selection.chosen].completion
            again = probe(embedder.embed(selection.candidates))
            assert torch.allclose(again, selection.q, atol=1e-4)
    texts = policy.sample(["What is 2 + 3?"], SamplingConfig(n=1, max_tokens=5, seed=1))
    assert len(texts) == 1 and len(texts[0]) == 1
    assert policy.describe()["kind"] == "qprobe_best_of_k" and policy.describe()["k"] == 4

    soft = BestOfKPolicy(policy.sampler, embedder, probe, k=4, beta=1e3)  # ~uniform pick
    soft.generate(prompts * 4, SamplingConfig(n=1, max_tokens=3, seed=2))
    picks = {s.chosen for row in soft.last_selections for s in row}
    assert len(picks) > 1, "a large β samples, it does not always take the argmax"


@pytest.mark.slow
def test_sigkilled_probe_run_recomputes_nothing_finished(tiny_model_dir, tmp_path):
    """A real `python -m qalign.probe` killed with SIGKILL while sampling, then once its training features are
    saved: each rerun keeps what was written and ends with the results of a run that was never killed."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    uninterrupted, killed = tmp_path / "whole", tmp_path / "killed"
    # One prompt per sampling chunk: a kill lands between chunks or inside one.
    extra = ("--sampler.batch_size", "1")
    assert main(cli_args(tiny_model_dir, uninterrupted, *extra)) == 0
    command = [sys.executable, "-m", "qalign.probe", *cli_args(tiny_model_dir, killed, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run_until(ready) -> None:
        process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 300
            while not ready() and time.time() < deadline and process.poll() is None:
                time.sleep(0.01)
            assert process.poll() is None, "the run finished before the kill"
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.wait()

    samples = killed / "samples_train.jsonl"
    run_until(lambda: samples.is_file() and len(samples.read_text().splitlines()) >= 8)  # 2 of 4 prompts
    written = samples.read_text().splitlines()
    assert 8 <= len(written) < 16, "the kill must land mid-sampling"

    features = killed / "features_train.pt"
    run_until(features.is_file)  # the rerun resamples nothing written, embeds train, then dies
    assert samples.read_text().splitlines()[: len(written)] == written  # never rewritten
    saved = features.read_bytes()

    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert features.read_bytes() == saved  # the finished embedding was reused, not recomputed
    whole = json.loads((uninterrupted / "results.json").read_text())
    assert json.loads((killed / "results.json").read_text())["tables"] == whole["tables"]
    assert (killed / "samples_train.jsonl").read_text() == (uninterrupted / "samples_train.jsonl").read_text()
