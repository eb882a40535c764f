"""The one config loader: every command reads keys, converts values and reports errors the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from qalign.config import ConfigError, ConfigSpec, convert, load_config
from tests.test_architecture import ROOT, _imported_modules, _within


def _train(argv, tmp_path):
    from qalign.train_config import parse_config

    loaded = parse_config([*argv, "--output_dir", str(tmp_path / "out")])
    return {"rollout": loaded.rollout, "script": loaded.script}


def _collect(argv, tmp_path):
    from qalign.collect import parse_collect_args

    args, rollout = parse_collect_args(argv)
    return {"rollout": rollout, "script": args}


def _eval(argv, tmp_path):
    from qalign.eval.config import parse_eval_args

    args = parse_eval_args(argv)
    return {"rollout": args, "script": args}


def _probe(argv, tmp_path):
    from qalign.probe.config import parse_probe_args

    args = parse_probe_args(argv)
    return {"embedder": args, "script": args}


LOADERS = {"train": _train, "collect": _collect, "eval": _eval, "probe": _probe}
NAMES = {"train": "grpo", "collect": "collect", "eval": "eval", "probe": "probe"}  # train names its algorithm


@pytest.mark.parametrize("command", LOADERS)
def test_the_same_bad_key_is_the_same_error_from_every_loader(command, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("temprature: 0.5\n")
    where = {"on the command line": ["--temprature", "0.5"], f"in {config}": ["--config", str(config)]}
    for source, argv in where.items():
        with pytest.raises(ConfigError) as error:
            LOADERS[command](argv, tmp_path)
        message = str(error.value)
        assert message.startswith(f"unknown {NAMES[command]} config key 'temprature' ({source}). Did you mean "
                                  "'temperature'"), message  # fmt: skip
        assert "\n" not in message


def _main(command: str):
    import importlib

    module = {"train": "qalign.train", "collect": "qalign.collect", "eval": "qalign.eval.__main__",
              "probe": "qalign.probe.__main__", "compare": "qalign.compare.__main__"}[command]  # fmt: skip
    return importlib.import_module(module).main


@pytest.mark.parametrize(
    ("command", "argv", "line"),
    [
        ("train", ["--temprature", "0.5"], "unknown grpo config key 'temprature' (on the command line)."),
        ("collect", ["--temprature", "0.5"], "unknown collect config key 'temprature' (on the command line)."),
        ("eval", ["--temprature", "0.5"], "unknown eval config key 'temprature' (on the command line)."),
        ("probe", ["--temprature", "0.5"], "unknown probe config key 'temprature' (on the command line)."),
        (
            "compare",
            ["--heldout.temprature", "0.5"],
            "unknown compare config key 'heldout_temprature' (on the command line).",
        ),
    ],
)
def test_every_command_reports_a_config_error_in_one_line_and_exits_2(command, argv, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(command)(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qalign: {line} Did you mean "), err


# (section, key, command-line values, value): a key inside a YAML section, and a list-valued key.
NESTED = {
    "train": ("rollout", "max_retries", ["3"], 3),
    "collect": ("rollout", "max_retries", ["3"], 3),
    "eval": ("rollout", "max_retries", ["3"], 3),
    "probe": ("embedder", "batch_size", ["3"], 3),
}
LISTS = {
    "train": ("script", "reward_funcs", ["accuracy", "format"], ["accuracy", "format"]),
    "collect": ("script", "reward_funcs", ["accuracy", "format"], ["accuracy", "format"]),
    "eval": ("script", "stop", ["</s>", "END"], ["</s>", "END"]),
    "probe": ("script", "betas", ["0", "0.5"], [0.0, 0.5]),
}


@pytest.mark.parametrize("command", LOADERS)
def test_a_nested_key_and_a_list_key_convert_the_same_from_yaml_and_the_command_line(command, tmp_path):
    section, key, cli_values, value = NESTED[command]
    group, list_key, list_cli, list_value = LISTS[command]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({section: {key: value}, list_key: list_value}))
    spellings = [
        ["--config", str(config)],
        [f"--{section}.{key}", *cli_values, f"--{list_key}", *list_cli],
        [f"--{section}_{key}={cli_values[0]}", f"--{list_key}", f"[{', '.join(list_cli)}]"],
    ]
    for argv in spellings:
        loaded = LOADERS[command](argv, tmp_path)
        nested_owner = loaded["rollout" if section == "rollout" else "embedder"]
        assert getattr(nested_owner, f"{section}_{key}") == value, argv
        assert getattr(loaded[group], list_key) == list_value, argv
    # One value for a list field is a one-item list, from either source.
    one = LOADERS[command]([f"--{list_key}", list_cli[0]], tmp_path)
    assert getattr(one[group], list_key) == [list_value[0]]


def test_values_convert_by_field_type():
    assert convert("lr", "1e-5", float, from_cli=True) == 1e-5  # YAML 1.1 reads 1e-5 as a string
    assert convert("lr", "1e-5", float, from_cli=False) == 1e-5
    assert convert("n", "8", int, from_cli=True) == 8
    assert convert("limit", "null", int | None, from_cli=True) is None
    assert convert("name", "null", str | None, from_cli=False) == "null"  # only the command line spells None
    assert convert("ks", "[1, 4]", list[int], from_cli=True) == [1, 4]
    assert convert("files", ["a=x", "b=y"], dict[str, str], from_cli=True) == {"a": "x", "b": "y"}
    with pytest.raises(ConfigError, match=r"^n: expected int, got 'many'$"):
        convert("n", "many", int, from_cli=True)
    with pytest.raises(ConfigError, match=r"^flag: expected bool, got 2$"):
        convert("flag", 2, bool, from_cli=False)


@dataclass
class Inner:
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"inner.size must be >= 1, got {self.size}")


@dataclass
class Outer:  # type hints are resolved from module globals, so the classes live here
    name: str
    inner: Inner = field(default_factory=Inner)


def test_a_dataclass_field_is_a_section_and_a_refused_value_is_a_config_error(tmp_path):
    spec = ConfigSpec(name="demo", classes=(Outer,), sections=("inner",))
    config = tmp_path / "c.yaml"
    config.write_text("name: x\ninner:\n  size: 3\n")
    (outer,) = load_config(["--config", str(config)], spec)
    assert outer == Outer("x", Inner(3))
    assert load_config(["--name", "y", "--inner.size", "2"], spec)[0] == Outer("y", Inner(2))
    with pytest.raises(ConfigError, match=r"^inner.size must be >= 1, got 0$"):
        load_config(["--name", "y", "--inner.size", "0"], spec)
    with pytest.raises(ConfigError, match=r"^demo config needs 'name'$"):
        load_config([], spec)
    with pytest.raises(ConfigError, match=r"^unknown demo config key 'inner_sise' \(on the command line\)\. "
                                          r"Did you mean 'inner_size'\?$"):  # fmt: skip
        load_config(["--inner.sise", "2"], spec)


def test_the_yaml_env_mapping_is_set_before_the_classes_are_built(tmp_path, monkeypatch):
    seen = {}

    @dataclass
    class Reads:
        def __post_init__(self) -> None:
            import os

            seen["value"] = os.environ.get("QALIGN_TEST_ENV")

    monkeypatch.setenv("QALIGN_TEST_ENV", "unset")  # so that the value the loader sets is undone after
    config = tmp_path / "c.yaml"
    config.write_text("env:\n  QALIGN_TEST_ENV: 7\n")
    load_config(["--config", str(config)], ConfigSpec(name="demo", classes=(Reads,)))
    assert seen == {"value": "7"}


def test_the_loader_imports_no_qalign_command():
    # Entry points pass their classes and valid keys in; the loader never reaches up to the trainers.
    modules = _imported_modules(ROOT / "config.py")
    assert [m for m in modules if _within(m, "qalign")] == []
    for loader in ("collect.py", "eval/config.py", "probe/config.py"):
        assert [m for m in _imported_modules(ROOT / loader) if _within(m, "qalign.trainers")] == [], loader
