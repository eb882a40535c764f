"""Eval config: YAML + overrides, types, unknown keys and bad values fail before any model loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qalign.eval.config import ConfigError, EvalArguments, parse_eval_args

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "eval.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides(tmp_path):
    config = _yaml(
        tmp_path,
        f"""
benchmarks: gsm8k
data_files: {{gsm8k: {FIXTURES / "gsm8k.jsonl"}}}
n: 4
temperature: 0.7
rollout: {{backend: hf}}
""",
    )
    args = parse_eval_args(
        [
            "--config",
            config,
            "--n",
            "8",
            "--k_values",
            "1",
            "8",
            "--top-p",
            "0.9",
            "--limit",
            "null",
            "--stop",
            "</s>",
            "--fallback_last_number",
        ]
    )
    assert args.benchmarks == ["gsm8k"]  # a single name is a one-item list
    assert args.data_files == {"gsm8k": str(FIXTURES / "gsm8k.jsonl")}
    assert (args.n, args.k_values, args.ks, args.temperature, args.top_p) == (8, [1, 8], [1, 8], 0.7, 0.9)
    assert args.limit is None and args.stop == ["</s>"] and args.fallback_last_number is True
    assert args.rollout_backend == "hf"
    assert args.rollout_arguments().rollout_backend == "hf"


def test_default_k_values_are_powers_of_two_up_to_n():
    assert EvalArguments(n=6, temperature=1.0).ks == [1, 2, 4, 6]


def test_data_files_override_merges_into_yaml(tmp_path):
    config = _yaml(tmp_path, f"benchmarks: [gsm8k, math500]\ndata_files: {{gsm8k: {FIXTURES / 'gsm8k.jsonl'}}}\n")
    args = parse_eval_args(["--config", config, "--data_files", f"math500={FIXTURES / 'math500.jsonl'}"])
    assert set(args.data_files) == {"gsm8k", "math500"}


def test_shipped_configs_parse():
    demo = parse_eval_args(["--config", str(REPO / "configs" / "eval_demo.yaml")])
    assert demo.benchmarks == ["arithmetic"] and demo.n == 4
    math = parse_eval_args(["--config", str(REPO / "configs" / "eval_math.yaml")])
    assert math.benchmarks == ["gsm8k", "math500", "aime24", "aime25", "amc23"] and math.ks == [1, 2, 4, 8]
    assert not math.data_files  # the shipped config reads the hub: no path that exists only on one machine


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"unknown eval config key 'temprature' \(in .*eval.yaml\)\. "
        r"Did you mean 'temperature'\?",
    ):
        parse_eval_args(["--config", _yaml(tmp_path, "temprature: 0.5\n")])
    with pytest.raises(ConfigError, match=r"'benchmark' \(on the command line\)\. Did you mean 'benchmarks'"):
        parse_eval_args(["--benchmark", "gsm8k"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--benchmarks", "gsm8k", "mat500"],
            r"unknown benchmark 'mat500'; valid: gsm8k, math500, aime24, aime25, "
            r"amc23, arithmetic\. Did you mean 'math500'\?",
        ),
        (
            ["--benchmarks", "gsm8k", "--data_files", "gsm8k=/no/such/test.jsonl"],
            r"data_files\.gsm8k: '/no/such/test\.jsonl' does not exist",
        ),
        (["--benchmarks", "gsm8k", "--data_files", "math500=x"], r"data_files names 'math500'"),
        (
            ["--n", "4", "--temperature", "1", "--k_values", "1", "8"],
            r"k_values \[1, 8\]: every k must be in \[1, n=4\]",
        ),
        (["--n", "4"], r"greedy \(temperature 0\) samples are identical"),
        (["--n", "many"], r"n: expected int, got 'many'"),
        (["--n", "0"], r"n must be >= 1"),
        (["--top_p", "0"], r"top_p must be in \(0, 1\]"),
        (["--prompt_template", "fancy"], r"prompt_template 'fancy' is not one of"),
        (["--rollout.backend", "tgi"], r"rollout.backend 'tgi' is not one of"),
        (["--model_name_or_path", "./no/such/model"], r"model_name_or_path: './no/such/model': no such folder"),
        (["--config", "/no/such.yaml"], r"config file '/no/such.yaml' does not exist"),
        (["positional"], r"unexpected argument 'positional'"),
    ],
)
def test_bad_values_fail_with_the_key_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_eval_args(argv)


def test_main_reports_bad_input_and_exits_2(capsys):
    from qalign.eval.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--benchmarks", "gsm9k"])
    assert exit_info.value.code == 2
    assert "qalign: unknown benchmark 'gsm9k'; valid: gsm8k" in capsys.readouterr().err


def test_validation_does_not_import_torch():
    import subprocess

    code = (
        "import sys; from qalign.eval.config import parse_eval_args; "
        "parse_eval_args(['--benchmarks', 'arithmetic']); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
