"""The training config: TRL's parser underneath for TRL's fields, fast and precise errors on top."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import subprocess
import sys
import time

import pytest

from qalign.config import ConfigError
from qalign.train_config import known_keys, parse_config

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def write(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_a_value_the_config_refuses_is_one_line_without_a_traceback(tmp_path):
    config = write(tmp_path, "algorithm: shiq\nbeta: 0\nrollouts_path: nowhere\n")
    result = subprocess.run(
        [sys.executable, "-m", "qalign.train", "--config", config], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "qalign: beta: 0 is out of range; a number > 0 (the KL temperature β divides)"
    ]


def test_typo_fails_fast_naming_the_key_and_the_fix(tmp_path):
    known_keys()  # the key index is built once per install (make test builds it); time the next run
    config = write(tmp_path, "lerning_rate: 1e-5\n")
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "qalign.train", "--config", config], capture_output=True, text=True, cwd=REPO
    )
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "lerning_rate" in result.stderr and "learning_rate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert elapsed < 5, elapsed


def test_unknown_algorithm_and_key_of_another_algorithm(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown algorithm 'qea'.*Did you mean 'qae'"):
        parse_config(["--config", write(tmp_path, "algorithm: qea\n")])
    with pytest.raises(ConfigError, match="'quantile_k' belongs to algorithm qae"):
        parse_config(["--config", write(tmp_path, "algorithm: grpo\nquantile_k: 0.4\n")])


def test_missing_dataset_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        parse_config(["--dataset_name", str(tmp_path / "nope.jsonl")])


def test_yaml_values_cli_overrides_and_sections(tmp_path):
    config = write(
        tmp_path,
        "algorithm: qae\nlearning_rate: 1e-5\nquantile_k: 0.6\nrollout:\n  backend: hf\n"
        f"output_dir: {tmp_path}/out\nreward_funcs: [accuracy, format]\nuse_peft: true\nlora_r: 4\n",
    )
    loaded = parse_config(["--config", config, "--max_steps", "3", "--quantile_interpolation=torch_linear"])
    assert loaded.algorithm == "qae"
    assert type(loaded.training).__name__ == "QAEConfig"
    assert loaded.training.learning_rate == 1e-5  # "1e-5" is a string to YAML: converted by field type
    assert loaded.training.quantile_k == 0.6 and loaded.training.quantile_interpolation == "torch_linear"
    assert loaded.training.max_steps == 3
    assert loaded.script.reward_funcs == ["accuracy", "format"]
    assert loaded.model.use_peft is True and loaded.model.lora_r == 4
    assert loaded.rollout.rollout_backend == "hf"
    assert loaded.training.bf16 is False  # CPU: no bf16 by default


def test_cli_section_syntax_and_list_values(tmp_path):
    loaded = parse_config(
        ["--output_dir", str(tmp_path), "--rollout.backend", "hf", "--reward_funcs", "accuracy", "format"]
    )
    assert loaded.rollout.rollout_backend == "hf"
    assert loaded.script.reward_funcs == ["accuracy", "format"]


def test_non_mapping_yaml_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="must hold a YAML mapping"):
        parse_config(["--config", write(tmp_path, "- a\n- b\n")])


TRAIN_CONFIGS = sorted(
    p.relative_to(REPO / "configs").as_posix()
    for p in [*(REPO / "configs").glob("*.yaml"), *(REPO / "configs" / "sweeps").glob("*.yaml")]
    if not p.name.startswith(("eval", "collect", "probe", "compare"))
)


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_every_shipped_training_config_parses(name, tmp_path):
    loaded = parse_config(["--config", str(REPO / "configs" / name), "--output_dir", str(tmp_path)])
    assert loaded.training.output_dir == str(tmp_path)


def test_the_slurm_recipe_arguments_parse(tmp_path):
    """configs/slurm/multinode.sbatch passes server URLs and a shared sync folder on the command line."""
    script = (REPO / "configs" / "slurm" / "multinode.sbatch").read_text()
    assert "--rollout.server_urls ${URLS[*]} --rollout.sync_dir $ROLLOUT_SYNC_DIR" in script
    loaded = parse_config([
        "--config", str(REPO / "configs" / "math.yaml"), "--output_dir", str(tmp_path),
        "--rollout.backend", "vllm_server", "--rollout.server_urls", "http://node0:8000", "http://node0:8001",
        "--rollout.sync_dir", str(tmp_path / "sync"),
    ])  # fmt: skip
    assert loaded.rollout.rollout_server_urls == ["http://node0:8000", "http://node0:8001"]
    assert loaded.rollout.rollout_sync_dir == str(tmp_path / "sync")


def test_qalign_config_prints_yaml_that_reruns_to_the_same_config(tmp_path):
    from qalign.train_config import main as config_main

    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--learning_rate", "3e-5", "--rollout.backend", "vllm",
            "--lr_scheduler_type", "cosine"]  # fmt: skip
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        config_main(argv)
    printed = buffer.getvalue()
    assert "learning_rate: 3.0e-05" in printed and "rollout:\n  backend: vllm" in printed
    assert "lr_scheduler_type: cosine" in printed  # an enum, written as its value
    saved = tmp_path / "resolved.yaml"
    saved.write_text(printed)
    first, again = parse_config(argv), parse_config(["--config", str(saved)])
    settings = lambda obj: {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name in ("script", "rollout", "training", "model"):
        assert settings(getattr(again, name)) == settings(getattr(first, name)), name


def test_train_help_is_fast_grouped_and_shows_the_chosen_algorithms_keys():
    known_keys()  # the index the help is read from is built once per install
    result = subprocess.run([sys.executable, "-m", "qalign.train", "--algorithm", "qae", "--help"],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert result.returncode == 0 and result.stderr == ""  # no library warnings
    lines = result.stdout.splitlines()
    assert lines[0].startswith("usage: qalign train --config X.yaml")
    groups = [line for line in lines if line and not line.startswith(" ") and line.endswith(":")]
    assert groups == ["qalign:", "rollout:", "qae:", "training (TRL / transformers):", "model (trl.ModelConfig):"]
    assert "  --quantile_k (default 0.4): K of the K-quantile baseline" in "\n".join(lines)
    assert any(line.startswith("  --learning_rate (default ") for line in lines)
    assert "torch" not in subprocess.run(  # answered from the cached index: TRL and torch are never imported
        [sys.executable, "-c", "import sys; from qalign.train import main\ntry: main(['--help'])\n"
         "except SystemExit: pass\nprint(sorted(m for m in ('torch', 'trl') if m in sys.modules))"],
        capture_output=True, text=True, cwd=REPO,
    ).stdout.split("\n")[-2]  # fmt: skip


def test_qalign_help_lists_every_command_with_a_line():
    from qalign.cli import COMMANDS

    result = subprocess.run([sys.executable, "-m", "qalign.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0
    for command in COMMANDS:
        assert any(line.startswith(f"  {command} ") and len(line.split()) > 3 for line in result.stdout.splitlines())
    version = subprocess.run(
        [sys.executable, "-m", "qalign.cli", "--version"], capture_output=True, text=True, cwd=REPO
    )
    assert version.returncode == 0 and version.stdout == f"qalign {__import__('qalign').__version__}\n"
    wrong = subprocess.run([sys.executable, "-m", "qalign.cli", "trian"], capture_output=True, text=True, cwd=REPO)
    assert wrong.returncode == 2 and wrong.stderr.strip() == (
        "qalign: unknown command 'trian'; valid: train, collect, eval, config, probe, compare, serve. Did you mean 'train'?"
    )
