"""End to end through the HF engine: the embedded default on the bundled arithmetic task (resume
after simulated and real kills gives the same summary), real GSM8K from a local file, and LoRA
adapter folders.

Generation here runs with one torch thread, in this process and in the subprocesses alike: on a
shared 2-core machine two OpenMP threads can stall each other for seconds per step, and equal
thread counts keep the floating-point reductions (hence the samples) identical across processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qalign.eval.config import EvalArguments, parse_eval_args
from qalign.eval.runner import EnginePolicy, load_policy, run_eval
from tests.needs import missing

REPO = Path(__file__).resolve().parents[2]
DEMO = [
    "--config",
    str(REPO / "configs" / "eval_demo.yaml"),
    "--n",
    "2",
    "--max_tokens",
    "24",
    "--problems_per_call",
    "1",
    "--show_progress",
    "false",
]


class CountingPolicy:
    """Delegates to a real policy and counts generate calls."""

    def __init__(self, inner: EnginePolicy):
        self.inner, self.tokenizer, self.calls = inner, inner.tokenizer, 0

    def describe(self):
        return self.inner.describe()

    def sample(self, prompts, sampling):
        self.calls += 1
        return self.inner.sample(prompts, sampling)

    def close(self):
        pass


@pytest.fixture(scope="module")
def one_thread():
    from tests.threads import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def default_policy(one_thread):
    """The embedded default behind HFEngine, loaded once for the module."""
    from qalign.models import embedded_default_path

    try:
        embedded_default_path()
    except ImportError as error:
        missing(f"embedded default model unavailable: {error}")
    return load_policy(parse_eval_args(DEMO))


def _demo_args(out: Path, *extra: str) -> EvalArguments:
    return parse_eval_args([*DEMO, "--output_dir", str(out), *extra])


def _lines(out: Path, name: str = "arithmetic") -> list[bytes]:
    return (out / "samples" / f"{name}.jsonl").read_bytes().splitlines(keepends=True)


def test_default_model_on_arithmetic_resumes_to_the_same_summary(tmp_path, default_policy):
    reference = tmp_path / "reference"
    policy = CountingPolicy(default_policy)
    summary = run_eval(_demo_args(reference, "--limit", "3"), policy)
    assert policy.calls == 3
    rows = [json.loads(line) for line in _lines(reference)]
    assert len(rows) == 6 and {(r["index"], r["sample"]) for r in rows} == {(i, s) for i in range(3) for s in (0, 1)}
    assert all(r["completion_tokens"] <= 24 and r["finish_reason"] in ("stop", "length") for r in rows)
    for name in ("summary.json", "summary.md", "pass_at_k.png"):
        assert (reference / name).is_file()
    assert summary["benchmarks"]["arithmetic"]["mean@n"] == pytest.approx(sum(r["correct"] for r in rows) / 6)

    # Killed after one problem, simulated with a limit: the rerun samples only problems 1 and 2.
    limited = tmp_path / "limited"
    run_eval(_demo_args(limited, "--limit", "1"), default_policy)
    policy = CountingPolicy(default_policy)
    run_eval(_demo_args(limited, "--limit", "3"), policy)
    assert policy.calls == 2
    assert (limited / "summary.json").read_bytes() == (reference / "summary.json").read_bytes()

    # Killed mid-write, simulated by truncating: 3 whole rows and half of the 4th survive.
    torn = tmp_path / "torn"
    (torn / "samples").mkdir(parents=True)
    meta = "samples/arithmetic.meta.json"
    (torn / meta).write_bytes((reference / meta).read_bytes())
    kept = b"".join(_lines(reference)[:3])
    (torn / "samples" / "arithmetic.jsonl").write_bytes(kept + _lines(reference)[3][:40])
    policy = CountingPolicy(default_policy)
    run_eval(_demo_args(torn, "--limit", "3"), policy)
    assert policy.calls == 2  # problem 1 (one sample missing) and problem 2; problem 0 is not sampled again
    after = b"".join(_lines(torn))
    assert after.startswith(kept) and len(_lines(torn)) == 6
    assert sorted(_lines(torn)) == sorted(_lines(reference))  # same seeds → byte-identical rows
    assert (torn / "summary.json").read_bytes() == (reference / "summary.json").read_bytes()


def _complete_problems(data: bytes) -> int:
    rows = [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]
    per_problem: dict[int, int] = {}
    for row in rows:
        per_problem[row["index"]] = per_problem.get(row["index"], 0) + 1
    return sum(count == 2 for count in per_problem.values())


@pytest.mark.slow
def test_sigkill_then_resume_in_a_subprocess(tmp_path, default_policy):
    limit = 8
    reference = tmp_path / "reference"
    run_eval(_demo_args(reference, "--limit", str(limit)), default_policy)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "qalign.eval", *DEMO, "--limit", str(limit), "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    samples = out / "samples" / "arithmetic.jsonl"
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if samples.is_file() and samples.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the eval ended before it could be killed: {process.communicate()[1][-2000:]!r}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    at_kill = samples.read_bytes()
    done = _complete_problems(at_kill)
    assert 1 <= done < limit

    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming, {done} of {limit} problems already sampled" in resumed.stderr
    data = samples.read_bytes()
    assert data.startswith(at_kill[: at_kill.rfind(b"\n") + 1])  # rows written before the kill are unchanged
    assert len(data.splitlines()) == 2 * limit
    assert (out / "summary.json").read_bytes() == (reference / "summary.json").read_bytes()
    assert f"(n=2, {limit} problems)" in resumed.stdout


@pytest.mark.slow
def test_real_gsm8k_from_a_local_file(tmp_path, default_policy, gsm8k_dir):
    test_file = gsm8k_dir / "test.jsonl"
    args = parse_eval_args(
        [
            "--benchmarks",
            "gsm8k",
            "--data_files",
            f"gsm8k={test_file}",
            "--limit",
            "24",
            "--n",
            "1",
            "--temperature",
            "0",
            "--max_tokens",
            "16",
            "--problems_per_call",
            "8",
            "--prompt_template",
            "boxed",
            "--output_dir",
            str(tmp_path),
            "--show_progress",
            "false",
        ]
    )
    policy = CountingPolicy(default_policy)
    summary = run_eval(args, policy)
    assert policy.calls == 3

    raw = [json.loads(line) for line in test_file.read_text().splitlines()[:24]]
    rows = sorted((json.loads(line) for line in _lines(tmp_path, "gsm8k")), key=lambda r: r["index"])
    assert len(rows) == 24 and [r["index"] for r in rows] == list(range(24))
    assert [r["gold"] for r in rows] == [item["answer"].split("####")[-1].strip().replace(",", "") for item in raw]
    assert [r["question"] for r in rows] == [item["question"] for item in raw]
    assert rows[0]["gold"] == "18"  # Janet's ducks
    result = summary["benchmarks"]["gsm8k"]
    accuracy = sum(r["correct"] for r in rows) / 24
    assert (result["problems"], result["n"], result["samples"]) == (24, 1, 24)
    assert result["pass@k"] == {"1": pytest.approx(accuracy)} and result["mean@n"] == pytest.approx(accuracy)
    assert result["maj@k"]["1"] == pytest.approx(sum(r["correct"] and r["extracted"] is not None for r in rows) / 24)
    assert result["answered"] == pytest.approx(sum(r["extracted"] is not None for r in rows) / 24)
    assert result["truncated"] == pytest.approx(sum(r["finish_reason"] == "length" for r in rows) / 24)


def test_lora_adapter_folder_loads_base_plus_adapter(tmp_path, tiny_model_dir, one_thread):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # init_lora_weights=False: random B, so the adapter really changes the outputs.
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert not (adapter / "tokenizer_config.json").exists()

    args = EvalArguments(
        model_name_or_path=str(adapter),
        benchmarks=["arithmetic"],
        limit=2,
        n=2,
        temperature=1.0,
        max_tokens=4,
        output_dir=str(tmp_path / "run"),
        show_progress=False,
        rollout_backend="hf",
    )
    policy = load_policy(args)
    ids = torch.tensor([policy.tokenizer("What is 3 + 4?")["input_ids"]])
    with torch.no_grad():
        merged = policy.engine.model(ids).logits
        expected = peft_model.eval()(ids).logits
        plain = base_logits_model(ids).logits
    assert torch.allclose(merged, expected, atol=1e-5)
    assert not torch.allclose(merged, plain, atol=1e-3)

    summary = run_eval(args, policy)
    assert summary["policy"]["model"] == str(adapter)
    assert len(_lines(tmp_path / "run")) == 4
