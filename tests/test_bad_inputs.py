"""Bad input through the real command lines: one line, exit 2, before torch loads, nothing left behind.

Each row runs one command in its own process, the way a user would type it, through a small driver that
records (in that process) which heavy libraries were imported by the time the command exited. A row
passes when the command exited with status 2, printed exactly one line on stderr, ``qalign: …``, holding
the row's expected words (the key, file or value at fault), had imported none of torch, transformers,
TRL, vLLM or datasets, and created no output folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qalign.train_config import known_keys

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "trl", "vllm", "datasets")

# Runs a command's main() as `python -m` would and writes its exit status and the heavy modules it loaded.
DRIVER = f"""
import importlib, json, sys
module, record, *args = sys.argv[1:]
sys.argv = [module, *args]
code = 0
try:
    importlib.import_module(module).main()
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
heavy = sorted(name for name in {HEAVY!r} if name in sys.modules)
json.dump({{"code": code, "heavy": heavy}}, open(record, "w"))
"""

TRAIN, COLLECT, EVAL, PROBE, COMPARE, CLI = (
    "qalign.train", "qalign.collect", "qalign.eval.__main__", "qalign.probe.__main__", "qalign.compare.__main__",
    "qalign.cli",
)  # fmt: skip
DEMO = ["--config", "configs/demo.yaml"]
SHIQ = ["--config", "configs/shiq_demo.yaml"]
COLLECT_DEMO = ["--config", "configs/collect_demo.yaml"]
EVAL_DEMO = ["--config", "configs/eval_demo.yaml"]
PROBE_DEMO = ["--config", "configs/probe_demo.yaml"]
COMPARE_DEMO = ["--config", "configs/compare_demo.yaml"]

# (command, arguments, words the one line must hold). {tmp} is a per-test folder with the files below.
ROWS = [
    # qalign.train: the table, then more
    (TRAIN, [*DEMO, "--max_steps", "-3"], ["max_steps", "-3", "-1"]),
    (
        TRAIN,
        [*DEMO, "--model_name_or_path", "/no/such/folder"],
        ["model_name_or_path", "/no/such/folder", "no such folder"],
    ),
    (TRAIN, [*DEMO, "--dataset_name", "{tmp}/empty.jsonl"], ["dataset_name", "empty.jsonl", "no rows"]),
    (TRAIN, [*DEMO, "--num_generations", "0"], ["num_generations", "0", ">= 2"]),
    (TRAIN, [*DEMO, "--num_generations", "3"], ["num_generations", "3", "16"]),
    (TRAIN, [*DEMO, "--rollout.backend", "sglang"], ["rollout.backend", "sglang", "vllm"]),
    (TRAIN, [*SHIQ, "--beta", "0"], ["beta", "> 0"]),
    (
        TRAIN,
        [*DEMO, "--dataset_name", "{tmp}/no_columns.jsonl"],
        ["dataset_name", "no_columns.jsonl", "question_column"],
    ),
    (TRAIN, [*DEMO, "--reward_funcs", "nosuch.module:fn"], ["reward_funcs", "nosuch.module"]),
    (TRAIN, [*DEMO, "--reward_funcs", "tests.reward_fixtures:positional_only"], ["reward_funcs", "**kwargs"]),
    (TRAIN, [*DEMO, "--resume_from_checkpoint", "/no/such"], ["resume_from_checkpoint", "/no/such", "no such folder"]),
    (TRAIN, [*DEMO, "--resume_from_checkpoint", "{tmp}"], ["resume_from_checkpoint", "trainer_state.json"]),
    (TRAIN, [*DEMO, "--resume_from_checkpoint", "{tmp}/checkpoint-8"], ["checkpoint-8/model.safetensors", "truncated"]),
    (TRAIN, ["--config", "{tmp}/broken.yaml"], ["broken.yaml", "YAML", "line"]),
    (TRAIN, [*DEMO, "--algorithm", "qae", "--quantile_k", "1.5"], ["quantile_k", "1.5", "(0, 1)"]),
    (TRAIN, [*DEMO, "--learning_rate", "abc"], ["learning_rate", "abc", "not a number"]),
    (TRAIN, [*DEMO, "--learning_rate", "0"], ["learning_rate", "> 0"]),
    (TRAIN, [*DEMO, "--per_device_train_batch_size", "0"], ["per_device_train_batch_size", ">= 1"]),
    (TRAIN, [*DEMO, "--gradient_accumulation_steps", "1.5"], ["gradient_accumulation_steps", "not an integer"]),
    (TRAIN, [*DEMO, "--temperature", "0"], ["temperature", "> 0"]),
    (TRAIN, [*DEMO, "--top_p", "1.2"], ["top_p", "1.2", "(0, 1]"]),
    (TRAIN, [*DEMO, "--max_completion_length", "0"], ["max_completion_length", ">= 1"]),
    (TRAIN, [*DEMO, "--eval_samples", "-1"], ["eval_samples", ">= 0"]),
    (TRAIN, ["--config", "configs/dqo_demo.yaml", "--lam", "2"], ["lam", "[0, 1]"]),
    (TRAIN, ["--config", "configs/qsharp_demo.yaml", "--eta", "0"], ["eta", "> 0"]),
    (TRAIN, [*DEMO, "--lerning_rate", "1e-5"], ["lerning_rate", "learning_rate"]),
    (TRAIN, [*DEMO, "--algorithm", "ppo"], ["ppo", "grpo"]),
    (TRAIN, ["--config", "{tmp}/missing.yaml"], ["missing.yaml", "does not exist"]),
    (CLI, ["train", *DEMO, "--num_train_epochs", "0"], ["num_train_epochs", "> 0"]),
    (TRAIN, [*DEMO, "--load_in_4bit"], ["load_in_4bit", "bitsandbytes"]),
    (TRAIN, [*DEMO, "--attn_implementation", "flash_attention_2"], ["attn_implementation", "flash_attn"]),
    (TRAIN, [*DEMO, "--attn_implementation", "fast"], ["attn_implementation", "'fast'", "sdpa"]),
    # qalign.collect
    (COLLECT, [*COLLECT_DEMO, "--num_samples", "0"], ["num_samples", ">= 1"]),
    (COLLECT, [*COLLECT_DEMO, "--temperature", "-1"], ["temperature", ">= 0"]),
    (COLLECT, [*COLLECT_DEMO, "--top_p", "1.5"], ["top_p", "1.5"]),
    (COLLECT, [*COLLECT_DEMO, "--max_tokens", "0"], ["max_tokens", ">= 1"]),
    (COLLECT, [*COLLECT_DEMO, "--model_name_or_path", "./nope"], ["model_name_or_path", "./nope", "no such folder"]),
    (COLLECT, [*COLLECT_DEMO, "--dataset_name", "{tmp}/empty.jsonl"], ["dataset_name", "no rows"]),
    (COLLECT, [*COLLECT_DEMO, "--dataset_name", "{tmp}/nowhere.jsonl"], ["dataset_name", "nowhere.jsonl"]),
    (COLLECT, [*COLLECT_DEMO, "--reward_funcs", "nosuch:fn"], ["reward_funcs", "nosuch"]),
    (COLLECT, [*COLLECT_DEMO, "--rollout.backend", "sglang"], ["rollout.backend", "sglang"]),
    # qalign.eval
    (EVAL, [*EVAL_DEMO, "--n", "0"], ["n must be >= 1"]),
    (EVAL, [*EVAL_DEMO, "--benchmarks", "gsm9k"], ["gsm9k", "gsm8k"]),
    (EVAL, [*EVAL_DEMO, "--temperature", "-0.5"], ["temperature", "-0.5"]),
    (EVAL, [*EVAL_DEMO, "--model_name_or_path", "/no/model"], ["model_name_or_path", "/no/model"]),
    (EVAL, [*EVAL_DEMO, "--limit", "-2"], ["limit", "-2"]),
    (EVAL, [*EVAL_DEMO, "--report_to", "tensorbored"], ["report_to", "tensorbored", "tensorboard"]),
    (EVAL, [*EVAL_DEMO, "--policy", "./no_policy"], ["policy", "./no_policy", "no such folder"]),
    (EVAL, [*EVAL_DEMO, "--policy", "{tmp}"], ["policy", "guided_policy.json", "best_of_k_policy.json"]),
    # qalign.probe
    (PROBE, [*PROBE_DEMO, "--samples_per_prompt", "0"], ["samples_per_prompt", ">= 1"]),
    (PROBE, [*PROBE_DEMO, "--losses", "foo"], ["losses", "foo", "pg"]),
    (PROBE, [*PROBE_DEMO, "--embedder.kind", "foo"], ["embedder.kind", "foo"]),
    (PROBE, [*PROBE_DEMO, "--k_values", "16"], ["k_values", "16"]),
    (PROBE, [*PROBE_DEMO, "--probe.lr", "-1"], ["probe.lr", "-1"]),
    (PROBE, [*PROBE_DEMO, "--temperature", "0"], ["temperature 0", "best-of-k"]),
    (PROBE, [*PROBE_DEMO, "--model_name_or_path", "./nope"], ["model_name_or_path", "./nope"]),
    # qalign.compare
    (COMPARE, [*COMPARE_DEMO, "--budget", "100"], ["budget 100", "16"]),
    (COMPARE, [*COMPARE_DEMO, "--budget", "-256"], ["budget", "-256"]),
    (COMPARE, [*COMPARE_DEMO, "--heldout.split", "foo"], ["heldout.split", "foo"]),
    (COMPARE, [*COMPARE_DEMO, "--only", "nosuch"], ["nosuch", "grpo"]),
    (COMPARE, [*COMPARE_DEMO, "--heldout.temperature", "0"], ["heldout.temperature", "> 0"]),
    (COMPARE, ["--config", "{tmp}/compare_bad_method.yaml"], ["method 'qae'", "quantile_k", "2"]),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    known_keys()  # the key index is built once per install; the commands below read it
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "no_columns.jsonl").write_text(json.dumps({"text": "1 + 1", "label": "2"}) + "\n")
    cut = tmp / "checkpoint-8"  # a checkpoint whose weights a kill cut short
    cut.mkdir()
    (cut / "trainer_state.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (cut / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 5)
    (tmp / "broken.yaml").write_text("learning_rate: [1e-5\nmax_steps: 3\n")
    compare = (REPO / "configs" / "compare_demo.yaml").read_text().replace("quantile_k: 0.4", "quantile_k: 2")
    (tmp / "compare_bad_method.yaml").write_text(compare)
    return tmp


def test_there_are_at_least_forty_rows():
    assert len(ROWS) >= 40 and len({(m, tuple(a)) for m, a, _ in ROWS}) == len(ROWS)


@pytest.mark.parametrize(
    ("module", "args", "words"), ROWS, ids=[f"{m.split('.')[1]}:{' '.join(a[2:])}" for m, a, _ in ROWS]
)
def test_bad_input_is_one_line_before_the_heavy_imports(inputs, tmp_path, module, args, words):
    output_dir = tmp_path / "out"
    record = tmp_path / "record.json"
    argv = [arg.replace("{tmp}", str(inputs)) for arg in args] + ["--output_dir", str(output_dir)]
    result = subprocess.run([sys.executable, "-c", DRIVER, module, str(record), *argv],
                            capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    outcome = json.loads(record.read_text())
    assert outcome["code"] == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("qalign: "), result.stderr[-2000:]
    for word in words:
        assert word.replace("{tmp}", str(inputs)) in lines[0], (word, lines[0])
    assert outcome["heavy"] == [], f"{outcome['heavy']} imported before the error: {lines[0]}"
    assert not output_dir.exists()


def test_debug_shows_the_traceback(inputs):
    result = subprocess.run([sys.executable, "-m", "qalign.train", *DEMO, "--max_steps", "-3", "--debug"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "Traceback" in result.stderr and "max_steps" in result.stderr
