"""Every trainer under 2 CPU processes: DDP (gloo), DeepSpeed ZeRO-2 and ZeRO-3, FSDP2; the value-based
trainers against one process on the same global batch; LoRA and save → resume under ZeRO-3 and FSDP2.

FSDP2 on CPU: accelerate makes an FSDP config FSDP only on accelerator devices, so those runs put
``fsdp_on_cpu/sitecustomize.py`` on PYTHONPATH, which lifts that one check (torch's ``fully_shard`` runs
on CPU with gloo; everything else is accelerate's and torch's own code).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "distributed" / "tiny_run.py"
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
FSDP_ON_CPU = REPO / "tests" / "distributed" / "fsdp_on_cpu"

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


OFFLINE = ["shiq", "dqo", "dqo_model"]  # dqo_model: DQO with a separate value trunk
STRATEGIES = ["ddp", "zero2", "zero3", "fsdp2"]
EXPECTED_TYPE = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "zero3_offload": "DEEPSPEED",
                 "fsdp2": "FSDP"}  # fmt: skip
ZERO_STAGE = {"zero2": 2, "zero3": 3, "zero3_offload": 3}
# The offload recipe is bf16, for GPUs; without CUDA qalign's configs train in fp32, and DeepSpeed refuses
# a precision that differs from the training arguments'.
LAUNCHER_OVERRIDES = {"zero3_offload": ["--mixed_precision", "no"]}
# Stated tolerance for "the loss of two processes equals one process's on the same global batch". The two
# runs differ only in float reduction order (a gradient all-reduce instead of one sum), so the per-step
# losses agree to ~1e-7 relative; parameters after Adam steps to ~1e-6.
LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-5
# A launch takes ~40 s here; one that runs 10 minutes is hung, not slow.
LAUNCH_TIMEOUT_S = 600
# DeepSpeed on CPU JIT-builds its shared-memory collective with torch's cpp_extension, which guards the
# build folder with a lock *file*: a process killed mid-build (an interrupted test run) leaves the lock
# behind and every later DeepSpeed process waits on it forever. This session's own, empty build folder
# (one ~30 s build per test session) keeps a stale lock in ~/.cache from hanging the suite.
TORCH_EXTENSIONS_DIR = tempfile.mkdtemp(prefix="qalign-test-torch-extensions-")
atexit.register(shutil.rmtree, TORCH_EXTENSIONS_DIR, ignore_errors=True)
# Strategies whose launch already hung in this session: the rest of their tests fail at once instead of
# each waiting out the timeout (a hung strategy would otherwise cost CI an hour).
HUNG: set[str | None] = set()


def launch_env(strategy: str | None) -> dict[str, str]:
    # PYTHONFAULTHANDLER: a process that aborts prints every thread's Python stack.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR}  # fmt: skip
    env.pop("WORLD_SIZE", None)
    if strategy == "fsdp2":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FSDP_ON_CPU), env.get("PYTHONPATH")]))
    return env


def run_launch(command: list[str], strategy: str | None) -> subprocess.CompletedProcess:
    """Run one launch; a hang fails this test after LAUNCH_TIMEOUT_S and the strategy's later tests at once."""
    if strategy in HUNG:
        pytest.fail(f"an earlier {strategy or 'one-process'} launch in this session hung; not waiting again")
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                                env=launch_env(strategy))  # fmt: skip
    except subprocess.TimeoutExpired as hung:
        HUNG.add(strategy)
        stderr = hung.stderr.decode(errors="replace") if isinstance(hung.stderr, bytes) else hung.stderr or ""
        pytest.fail(f"{strategy} launch hung for {LAUNCH_TIMEOUT_S} s; its stderr ends:\n{stderr[-4000:]}")
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def launch(strategy: str | None, model_dir: Path, out_dir: Path, algorithm: str, steps: int, *extra: str):
    """Run tiny_run.py under ``strategy`` on 2 processes (``None``: one plain process); the rank records."""
    if strategy is None:
        command = [sys.executable]
    elif strategy == "ddp":
        # accelerate's --cpu flag starts a single process unless MPI is set up; --multi_gpu (torchrun) on a
        # machine without CUDA gives gloo processes, which qalign's configs put on the CPU.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch",
                   "--config_file", str(ACCELERATE_CONFIGS / f"{strategy}.yaml"), *LAUNCHER_OVERRIDES.get(strategy, [])]  # fmt: skip
    command += [str(SCRIPT), str(model_dir), str(out_dir), algorithm, str(steps), *extra]
    run_launch(command, strategy)
    ranks = (0,) if strategy is None else (0, 1)
    records = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in ranks]
    # Assert the launch really was two ranks (DeepSpeed on CPU has been seen to report rank 0 everywhere).
    assert [r["world_size"] for r in records] == [len(ranks)] * len(ranks)
    assert [r["rank"] for r in records] == list(ranks)
    return records


def extra_args(algorithm: str, rollouts: Path) -> list[str]:
    return ["--rollouts", str(rollouts)] if algorithm in OFFLINE else []


@pytest.fixture(scope="module")
def single_process_runs(tiny_model_dir, tiny_rollouts, tmp_path_factory):
    """One plain process on the same global batch, per algorithm (computed on first use)."""
    runs: dict[str, dict] = {}

    def get(algorithm: str) -> dict:
        if algorithm not in runs:
            out = tmp_path_factory.mktemp(f"single-{algorithm}")
            runs[algorithm] = launch(None, tiny_model_dir, out, algorithm, 2, *extra_args(algorithm, tiny_rollouts))[0]
        return runs[algorithm]

    return get


def assert_ranks_agree(records: list[dict], strategy: str) -> None:
    assert records[0]["distributed_type"] == f"DistributedType.{EXPECTED_TYPE[strategy]}"
    assert records[0]["zero_stage"] == ZERO_STAGE.get(strategy)
    # After the optimizer steps, the full parameters are identical on both ranks.
    assert records[0]["checksum"] == records[1]["checksum"]
    # Losses (and rewards) are gathered/averaged across ranks: both ranks log the same values.
    assert records[0]["losses"] == records[1]["losses"] and records[0]["losses"]
    assert records[0]["rewards"] == records[1]["rewards"]
    # Each rank generated for 1 + rank prompts after training (different numbers of forwards).
    assert [r["generated_prompts"] for r in records] == [1, 2]


# QAE differs from GRPO only in the advantage it computes from the gathered rewards, which no strategy changes:
# one strategy (the sharded one) is enough for it, and each launch costs ~40 s of the suite.
@pytest.mark.parametrize(("algorithm", "strategy"), [*(("grpo", s) for s in STRATEGIES), ("qae", "zero3")])
def test_online_trainers_two_ranks_agree(tiny_model_dir, tmp_path, strategy, algorithm):
    records = launch(strategy, tiny_model_dir, tmp_path, algorithm, 2)
    assert_ranks_agree(records, strategy)
    assert len(records[0]["rewards"]) == 2
    # No single-process comparison: each rank samples its own completions with its own RNG stream, so
    # the loss of a 2-process run is a different sample from a 1-process run's (rewards are gathered).


# The SFT anchor runs a second forward of the wrapped model, on the successful rows only, so one rank may run it
# while the other does not: the gradient all-reduce (DDP) and the per-forward gathers (ZeRO-3) must still match.
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_grpo_with_the_sft_anchor_two_ranks_agree(tiny_model_dir, tmp_path, strategy):
    records = launch(strategy, tiny_model_dir, tmp_path, "grpo", 2, "--sft-coef", "1.0")
    assert_ranks_agree(records, strategy)
    assert records[0]["sft_nll"] and records[0]["sft_nll"] == records[1]["sft_nll"]


# DQO's separate value trunk (dqo_model) is a second model to shard: it adds to ZeRO-3 and FSDP2, which split
# parameters, and nothing to DDP and ZeRO-2, which keep every parameter on every rank.
@pytest.mark.parametrize(
    ("algorithm", "strategy"),
    [(a, s) for a in ("shiq", "dqo", "dqo_model", "qsharp") for s in STRATEGIES
     if a != "dqo_model" or s in ("zero3", "fsdp2")],
)  # fmt: skip
def test_value_based_trainers_match_one_process(tiny_model_dir, tiny_rollouts, tmp_path, single_process_runs,
                                                strategy, algorithm):  # fmt: skip
    records = launch(strategy, tiny_model_dir, tmp_path, algorithm, 2, *extra_args(algorithm, tiny_rollouts))
    assert_ranks_agree(records, strategy)
    # Offline data (and Q#'s per-chunk-seeded collection) do not depend on the number of processes, so the
    # two-process run sees the same global batches as one process and must follow the same trajectory.
    single = single_process_runs(algorithm)
    assert records[0]["losses"].keys() == single["losses"].keys()
    for step, loss in single["losses"].items():
        assert records[0]["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), step
    assert records[0]["checksum"] == pytest.approx(single["checksum"], rel=PARAM_RTOL)


def test_zero3_with_cpu_offload_matches_one_process(tiny_model_dir, tiny_rollouts, tmp_path, single_process_runs):
    """configs/accelerate/zero3_offload.yaml (parameters and optimizer states in CPU memory, DeepSpeed's CPU
    Adam): DQO with its value head follows the single-process trajectory."""
    records = launch("zero3_offload", tiny_model_dir, tmp_path, "dqo", 2, *extra_args("dqo", tiny_rollouts))
    assert_ranks_agree(records, "zero3_offload")
    single = single_process_runs("dqo")
    for step, loss in single["losses"].items():
        assert records[0]["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), step
    assert records[0]["checksum"] == pytest.approx(single["checksum"], rel=PARAM_RTOL)


@pytest.mark.vllm
@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp2"])
def test_grpo_with_in_process_vllm_on_two_ranks(tiny_model_dir, tmp_path, strategy):
    """Each rank samples through its own vLLM engine; under ZeRO-3 and FSDP2 the sync gathers the sharded
    weights first. The engine's log-probs then equal the trained model's at every step (lr 1e-2 moves the
    weights visibly, so a missed or partial sync would show)."""
    records = launch(strategy, tiny_model_dir, tmp_path, "grpo", 2, "--rollout", "vllm")
    assert_ranks_agree(records, strategy)
    for record in records:
        assert len(record["sampling_logp_max"]) == 2 and max(record["sampling_logp_max"]) < 1e-3, record


@pytest.mark.vllm
# ZeRO-3 only: its pushes gather shards (a collective) while the background thread generates, the case DDP and
# FSDP2 add nothing to here (their lock-step runs are above), and each launch costs ~2 min of the suite.
@pytest.mark.parametrize("strategy", ["zero3"])
def test_grpo_one_step_ahead_with_in_process_vllm_on_two_ranks(tiny_model_dir, tmp_path, strategy):
    """``rollout.async_steps: 1``: each rank's engine samples the next step's batch on a background thread while
    the step trains. vLLM generates without collectives; the pushes, which gather ZeRO-3 shards, stay on the
    training thread, between generations. The ranks agree, and a batch's sampler log-probs match the trained
    weights exactly when its logged lag is 0, and differ visibly (lr 1e-2) when it was sampled a step behind."""
    records = launch(strategy, tiny_model_dir, tmp_path, "grpo", 3, "--rollout", "vllm", "--async-steps", "1")
    assert_ranks_agree(records, strategy)
    for record in records:
        assert len(record["staleness"]) == 3 and set(record["staleness"]) <= {0.0, 1.0}, record
        assert record["staleness"][0] == 0.0 and sum(record["staleness"]) >= 1, record
        for lag, gap in zip(record["staleness"], record["sampling_logp_max"]):
            assert (gap > 1e-2) if lag else (gap < 1e-3), record


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
@pytest.mark.parametrize("algorithm", ["grpo", "dqo"])
def test_lora_under_sharding(tiny_model_dir, tiny_rollouts, tmp_path, strategy, algorithm):
    records = launch(strategy, tiny_model_dir, tmp_path, algorithm, 2, "--lora", *extra_args(algorithm, tiny_rollouts))
    assert_ranks_agree(records, strategy)
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key or "value_head" in key for key in adapter)


def assert_sharded_checkpoint(checkpoint: Path, strategy: str) -> None:
    if strategy == "zero3":
        assert any(checkpoint.glob("global_step1/*optim_states.pt")), "ZeRO-3 sharded optimizer states not saved"
    else:  # FSDP2 with SHARDED_STATE_DICT: torch.distributed.checkpoint folders, one file per rank
        assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
        assert len(list((checkpoint / "optimizer_0").glob("*.distcp"))) == 2


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_save_and_resume_sharded(tiny_model_dir, tmp_path, strategy):
    # The interrupted run stops after step 1 (max_steps=1); the schedule is constant, so only the
    # checkpoint carries state from the first run into the resumed one.
    full = launch(strategy, tiny_model_dir, tmp_path / "full", "grpo", 3)
    launch(strategy, tiny_model_dir, tmp_path / "part", "grpo", 1)
    checkpoint = tmp_path / "part" / "checkpoint-1"
    assert_sharded_checkpoint(checkpoint, strategy)
    resumed = launch(strategy, tiny_model_dir, tmp_path / "part", "grpo", 3, "--resume", str(checkpoint))
    # The sampled completions after the resume are the same (RNG, data order and weights restored), so
    # the rewards match; the final weights match to 1e-6 relative (reductions may differ in the last bits).
    # (GRPO's on-policy loss is ~1e-7 here, too close to zero to compare meaningfully.)
    for step in ("2", "3"):
        assert resumed[0]["rewards"][step] == pytest.approx(full[0]["rewards"][step], rel=1e-6)
    assert resumed[0]["checksum"] == pytest.approx(full[0]["checksum"], rel=1e-6)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_save_and_resume_sharded_dqo(tiny_model_dir, tiny_rollouts, tmp_path, strategy):
    """An offline trainer with a value head: the resumed run's later losses equal the uninterrupted run's."""
    rollouts = extra_args("dqo", tiny_rollouts)
    full = launch(strategy, tiny_model_dir, tmp_path / "full", "dqo", 3, *rollouts)
    launch(strategy, tiny_model_dir, tmp_path / "part", "dqo", 1, *rollouts)
    checkpoint = tmp_path / "part" / "checkpoint-1"
    assert_sharded_checkpoint(checkpoint, strategy)
    resumed = launch(strategy, tiny_model_dir, tmp_path / "part", "dqo", 3, "--resume", str(checkpoint), *rollouts)
    for step in ("2", "3"):
        assert resumed[0]["losses"][step] == pytest.approx(full[0]["losses"][step], rel=1e-6)
    assert resumed[0]["checksum"] == pytest.approx(full[0]["checksum"], rel=1e-6)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
@pytest.mark.parametrize("algorithm", ["shiq", "qsharp"])
def test_qalign_train_cli_under_sharding(tiny_model_dir, tmp_path, strategy, algorithm):
    """The user's command: `accelerate launch --config_file configs/accelerate/{zero3,fsdp2}.yaml -m
    qalign.train`. ShiQ's rollouts are collected on the main process first (models loaded whole there:
    ZeRO-3 loading is a collective); the before/after evaluations gather the sharded weights; Q#'s after is
    the guided policy. The final model is a from_pretrained folder under both."""
    from tests.trainers.helpers import write_collect_yaml

    common = ["--model_name_or_path", str(tiny_model_dir), "--prompt_template", "plain", "--eval_samples", "4",
              "--reward_funcs", "tests.trainers.helpers:digit_fraction_reward", "--output_dir", str(tmp_path / "out"),
              "--report_to", "none", "--max_completion_length", "8"]  # fmt: skip
    if algorithm == "shiq":
        collect_yaml = write_collect_yaml(tmp_path / "collect.yaml", tiny_model_dir, tmp_path / "rollouts")
        args = [
            "--algorithm",
            "shiq",
            "--rollouts_path",
            str(tmp_path / "rollouts"),
            "--collect_config",
            str(collect_yaml),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--save_strategy",
            "no",
        ]
    else:
        args = [
            "--algorithm",
            "qsharp",
            "--value_num_layers",
            "1",
            "--num_iterations",
            "2",
            "--max_train_samples",
            "8",
            "--num_samples_per_prompt",
            "2",
            "--collection_chunk_size",
            "2",
            "--guidance_top_k",
            "8",
            "--drop_no_variation",
            "false",
            "--value_head",
            "histogram",
            "--v_min",
            "0",
            "--v_max",
            "1",
        ]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ACCELERATE_CONFIGS / f"{strategy}.yaml"), "-m", "qalign.train", *common, *args]  # fmt: skip
    result = run_launch(command, strategy)
    assert f"qalign: {algorithm} on 2 processes ({EXPECTED_TYPE[strategy]})" in result.stdout
    assert "before: " in result.stdout and " after: " in result.stdout
    if algorithm == "shiq":
        assert (tmp_path / "rollouts" / "shard-00000.parquet").is_file()
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
        initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
        assert trained.keys() == initial.keys()
        assert any(not torch.equal(trained[k], initial[k]) for k in initial)  # trained, whole, not shards
        assert all(tensor.abs().sum() > 0 for tensor in trained.values())
    else:
        assert "KL(guided || pi_ref)" in result.stdout
        assert (tmp_path / "out" / "guided_policy.json").is_file()
