"""QSharpTrainer end to end on the tiny Llama: two iterations of collect → fit, the saved guided policy,
resume, and the ``qalign.train`` wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qalign.config import ConfigError
from qalign.decoding.collect_qsharp import load_examples, read_rows
from qalign.rollout.base import SamplingConfig
from qalign.trainers.qsharp import QSharpConfig, QSharpTrainer, ValueCollator
from tests.trainers.helpers import tiny_prompt_dataset


def even_first_token_reward(completion_ids, **kwargs) -> list[float]:
    """1 when the response starts with an even token id: learnable by a value model from (s, a)."""
    return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]


def tiny_args(output_dir, **overrides) -> QSharpConfig:
    kwargs = dict(
        output_dir=str(output_dir), value_num_layers=1, num_iterations=2, num_samples_per_prompt=4,
        max_completion_length=6, collection_chunk_size=4, guidance_top_k=8, eta=0.5, learning_rate=3e-3,
        num_train_epochs=4, per_device_train_batch_size=16, logging_steps=1, report_to="none", seed=0,
        use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return QSharpConfig(**kwargs)


def mean_value_loss(trainer: QSharpTrainer, rows: list[dict]) -> float:
    batch = ValueCollator(trainer.processing_class.pad_token_id)(rows)
    model = trainer.value_model().eval()
    with torch.no_grad():
        return float(trainer.compute_loss(model, batch))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    from qalign.models import load_model, load_tokenizer

    out = tmp_path_factory.mktemp("qsharp")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ref = load_model(str(tiny_model_dir))
    args = tiny_args(out)
    trainer = QSharpTrainer(
        str(tiny_model_dir), args, ref, tokenizer, tiny_prompt_dataset(12), [even_first_token_reward]
    )
    trainer.train()
    examples = load_examples(trainer._data_files(2), drop_no_variation=True)
    fresh = QSharpTrainer(str(tiny_model_dir), tiny_args(out / "fresh"), ref, tokenizer, tiny_prompt_dataset(4),
                          [even_first_token_reward])  # fmt: skip
    untrained_loss = mean_value_loss(fresh, examples)
    trainer.save_model(str(out))
    return trainer, out, examples, untrained_loss, tokenizer, ref


def test_two_iterations_fit_the_value_model(trained):
    trainer, _out, examples, untrained_loss, _, _ = trained
    assert [s["iteration"] for s in trainer.iteration_stats] == [1.0, 2.0]
    # Round 2 rolls in with the guided policy of round 1: it differs from π_ref.
    assert trainer.iteration_stats[1]["rollin_kl_per_token"] > 1e-3
    assert len({e["reward"] for e in examples}) == 2
    trained_loss = mean_value_loss(trainer, examples)
    assert trained_loss < untrained_loss - 0.05, (untrained_loss, trained_loss)


def test_saved_guided_policy_decodes_like_the_trainer(trained):
    from qalign.decoding.guided import load_guided_engine

    trainer, out, _, _, tokenizer, _ = trained
    record = json.loads((out / "guided_policy.json").read_text())
    assert record["eta"] == 0.5 and record["top_k"] == 8 and record["value_model"] == "value_model"
    engine, _, _ = load_guided_engine(out)
    prompts = [tokenizer("What is 2 + 3?\n")["input_ids"], tokenizer("Ana has 4 coins\n")["input_ids"]]
    greedy = SamplingConfig(temperature=0.0, max_tokens=6)
    with trainer.heldout_policy_engine(tokenizer) as trainer_engine:
        from_trainer = trainer_engine.generate(prompts, greedy)
    reloaded = engine.generate(prompts, greedy)
    assert [c[0].completion_ids for c in from_trainer] == [c[0].completion_ids for c in reloaded]
    assert engine.kl_summary()["kl_per_token"] > 0


def test_finished_iterations_are_not_redone(trained, tiny_model_dir):
    trainer, out, _, _, tokenizer, ref = trained
    again = QSharpTrainer(
        str(tiny_model_dir), tiny_args(out), ref, tokenizer, tiny_prompt_dataset(12), [even_first_token_reward]
    )
    again.train()
    assert again.iteration_stats == []  # nothing collected or fitted
    saved, loaded = trainer.value_model().state_dict(), again.value_model().state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_a_resume_on_answers_changed_since_refuses_the_earlier_iterations_rows(trained, tiny_model_dir):
    _, out, _, _, tokenizer, ref = trained
    data = tiny_prompt_dataset(12)
    rows = read_rows(out / "qsharp_data" / "iter01.rank0.jsonl")
    assert [row["reward_columns"] for row in rows[::4]] == [{"answer": answer} for answer in data["answer"]]
    # One more iteration on the same prompts with one gold answer corrected: iteration 3's fit would aggregate
    # rows graded against the old answer, so it stops before collecting anything.
    corrected = data.map(lambda row, i: {"answer": "1000" if i == 5 else row["answer"]}, with_indices=True)
    before = {p.name: p.read_bytes() for p in (out / "qsharp_data").iterdir()}
    again = QSharpTrainer(str(tiny_model_dir), tiny_args(out, num_iterations=3), ref, tokenizer, corrected,
                          [even_first_token_reward])  # fmt: skip
    with pytest.raises(ConfigError, match=rf"iter01\.rank0\.jsonl holds samples of other problems than the data "
                                          rf"now has \(problem 5: stored .*'answer': '{data['answer'][5]}'\}}\), now "
                                          r".*'answer': '1000'\}\)\)"):  # fmt: skip
        again.train()
    assert again.iteration_stats == []
    assert {p.name: p.read_bytes() for p in (out / "qsharp_data").iterdir()} == before


def test_qalign_train_builds_the_trainer(tiny_model_dir, tmp_path, monkeypatch):
    import os

    from qalign.models import load_model, load_tokenizer
    from qalign.train import build_trainer
    from qalign.train_config import parse_config

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the demo's `env:` must not leak into other tests
    loaded = parse_config([
        "--config", str(Path(__file__).resolve().parents[2] / "configs" / "qsharp_demo.yaml"),
        "--model_name_or_path", str(tiny_model_dir),
        "--prompt_template", "plain", "--output_dir", str(tmp_path), "--value_num_layers", "1",
    ])  # fmt: skip
    assert loaded.training.eta == 0.1 and loaded.training.guidance_top_k == 20
    tokenizer = load_tokenizer(str(tiny_model_dir))
    trainer = build_trainer(
        loaded, load_model(str(tiny_model_dir)), tokenizer, tiny_prompt_dataset(4), [even_first_token_reward]
    )
    assert isinstance(trainer, QSharpTrainer)
    assert trainer.reference_id == str(tiny_model_dir)
    assert len(trainer.value_model().trunk.layers) == 1


@pytest.mark.vllm
@pytest.mark.slow
def test_qalign_train_with_vllm_starts_one_engine_that_can_guide(tiny_model_dir, tmp_path, monkeypatch):
    """``rollout.backend: vllm``: π_ref's engine is started with the Q# processor, so the roll-ins use it."""
    import os

    from tests.needs import require

    require("vllm")
    from qalign.decoding.vllm_guided import GuidedRequests, accepts_guided_requests
    from qalign.models import load_model, load_tokenizer
    from qalign.train import build_trainer
    from qalign.train_config import parse_config

    monkeypatch.setattr(os, "environ", dict(os.environ))
    loaded = parse_config([
        "--config", str(REPO / "configs" / "qsharp_demo.yaml"), "--model_name_or_path", str(tiny_model_dir),
        "--prompt_template", "plain", "--output_dir", str(tmp_path), "--value_num_layers", "1",
        "--rollout.backend", "vllm",
    ])  # fmt: skip
    trainer = build_trainer(loaded, load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)),
                            tiny_prompt_dataset(4), [even_first_token_reward])  # fmt: skip
    try:
        assert accepts_guided_requests(trainer.ref_engine)
        trainer._save_iteration(1)
        assert isinstance(trainer._rollin_engine(2, trainer.value_model()), GuidedRequests)
    finally:
        trainer.ref_engine.close()


def qsharp_command(tiny_model_dir: Path, out: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "qalign.train", "--algorithm", "qsharp", "--rollout.backend", "hf", "--model_name_or_path",
            str(tiny_model_dir), "--prompt_template", "plain", "--eval_samples", "0", "--report_to", "none",
            "--reward_funcs", "tests.trainers.helpers:digit_fraction_reward", "--max_completion_length", "6",
            "--value_num_layers", "1", "--num_iterations", "2", "--max_train_samples", "8",
            "--num_samples_per_prompt", "2", "--collection_chunk_size", "1", "--guidance_top_k", "8",
            "--drop_no_variation", "false", "--value_head", "histogram", "--v_min", "0", "--v_max", "1",
            "--per_device_train_batch_size", "8", "--num_train_epochs", "20", "--output_dir", str(out)]  # fmt: skip


QSHARP_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def uninterrupted_qsharp(tiny_model_dir, tmp_path_factory) -> Path:
    import os
    import subprocess

    whole = tmp_path_factory.mktemp("qsharp_whole")
    result = subprocess.run(qsharp_command(tiny_model_dir, whole), cwd=REPO, env={**os.environ, **QSHARP_ENV},
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return whole


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["collection", "fit"])
def test_sigkill_inside_the_second_iteration_resumes_to_the_uninterrupted_result(
    tiny_model_dir, tmp_path, uninterrupted_qsharp, stage
):
    """`qalign.train --algorithm qsharp` killed while iteration 2 collects, or once its data is complete (during
    its fit): the rerun keeps iteration 1's data and value model and iteration 2's rows already written, and
    ends with the value model of a run never killed."""
    import os
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    env = {**os.environ, **QSHARP_ENV}
    whole, killed = uninterrupted_qsharp, tmp_path / "killed"
    second = killed / "qsharp_data" / "iter02.rank0.jsonl"
    rows_in_whole = (whole / "qsharp_data" / "iter02.rank0.jsonl").read_text().count("\n")
    wanted = 2 if stage == "collection" else rows_in_whole
    process = subprocess.Popen(qsharp_command(tiny_model_dir, killed), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 600
        while not (second.is_file() and second.read_text().count("\n") >= wanted) and time.time() < deadline:
            assert process.poll() is None, "the run finished before the kill"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert not (killed / "iter02").exists(), "iteration 2's fit finished before the kill"
    first_rows = (killed / "qsharp_data" / "iter01.rank0.jsonl").read_text()
    second_rows = second.read_text()
    assert 0 < second_rows.count("\n") <= rows_in_whole
    if stage == "collection":
        assert second_rows.count("\n") < rows_in_whole

    result = subprocess.run(qsharp_command(tiny_model_dir, killed), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iterations 1..1 already done" in result.stderr  # iteration 1's fit was not redone
    assert (killed / "qsharp_data" / "iter01.rank0.jsonl").read_text() == first_rows
    assert second.read_text().startswith(second_rows)  # rows written before the kill are kept as they were
    for name in ("iter01.rank0.jsonl", "iter02.rank0.jsonl"):
        assert (killed / "qsharp_data" / name).read_text() == (whole / "qsharp_data" / name).read_text()
    resumed, uninterrupted = (load_file(folder / "value_model" / "model.safetensors") for folder in (killed, whole))
    assert resumed.keys() == uninterrupted.keys()
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=1e-6, msg=key)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_reference_engine_rolls_in_like_hf_with_greedy_collection(tiny_model_dir, tmp_path):
    """With π_ref's engine in vLLM (as ``rollout.backend: vllm`` builds it) iteration 2's guided roll-ins run
    on that engine, with the value model iteration 1 saved. Collected greedily, both iterations' rows equal an
    all-HF run's: the same roll-ins, switch points, roll-outs and labels, so the same value model in between."""
    from tests.needs import require

    require("vllm")
    from qalign.decoding.vllm_guided import guided_requests_kwargs
    from qalign.models import load_model, load_tokenizer
    from qalign.rollout import VLLMEngine

    tokenizer, ref = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    rows, metas = {}, {}
    for backend in ("hf", "vllm"):
        engine = None
        if backend == "vllm":
            engine = VLLMEngine(str(tiny_model_dir), dtype="float32", max_model_len=256, seed=0,
                                **guided_requests_kwargs())  # fmt: skip
        # One sample per prompt: vLLM refuses n > 1 with greedy sampling.
        args = tiny_args(tmp_path / backend, temperature=0.0, num_samples_per_prompt=1, drop_no_variation=False,
                         diagnostics_holdout_fraction=0.0)  # fmt: skip
        trainer = QSharpTrainer(str(tiny_model_dir), args, ref, tokenizer, tiny_prompt_dataset(8),
                                [even_first_token_reward], ref_engine=engine)  # fmt: skip
        trainer.train()
        rows[backend] = [read_rows(path) for k in (1, 2) for path in trainer._iteration_files(k)]
        metas[backend] = sorted(trainer.data_dir.glob("iter02*.meta.json"))
    assert rows["vllm"] == rows["hf"] and len(rows["hf"][1]) == 8
    assert any(row["switch"] < row["rollin_length"] - 1 for row in rows["hf"][1])  # some roll-outs were sampled
    (meta,) = metas["vllm"]
    assert json.loads(meta.read_text())["policy"]["rollin_backend"] == "vllm"
