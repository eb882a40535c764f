"""Config loading: ``--config X.yaml`` plus ``--key value`` overrides, through TRL's parser.

Every TRL/transformers training field works under its own name. ``algorithm:`` picks the
trainer config class from the registry. Nested YAML sections are flattened with their section
name as prefix (``rollout: {backend: vllm}`` ≡ ``rollout_backend: vllm`` ≡ ``--rollout.backend vllm``).

Unknown keys fail *before* torch or TRL are imported (those imports alone take ~5 s): the set of
valid keys per algorithm is cached on disk, keyed by the installed TRL/transformers/peft versions
and the source of qalign's config classes, so a stale cache cannot reject a real field.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from qalign.atomic import write_atomic
from qalign.rollout.config import RolloutArguments
from qalign.trainers.registry import TRAINERS

# YAML sections that flatten into prefixed fields.
SECTIONS = ("rollout", "reward")


class ConfigError(ValueError):
    """A config the user can fix: the message names the bad key/value and what would be valid."""


@dataclass
class QAlignArguments:
    """What to train on and how to judge it; the trainer's own knobs live in its config class."""

    algorithm: str = field(default="grpo", metadata={"help": f"Trainer to run: one of {sorted(TRAINERS)}."})
    dataset_name: str = field(
        default="arithmetic",
        metadata={"help": "Bundled task name ('arithmetic'), a hub dataset id (e.g. openai/gsm8k), or a local "
                  ".jsonl/.json/.parquet file or a folder of <split>.jsonl/<split>.parquet files."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. 'main' for gsm8k)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split for the before/after accuracy."})
    question_column: str | None = field(
        default=None, metadata={"help": "Column holding the problem text; detected when unset (question, problem, …)."}
    )
    answer_column: str | None = field(
        default=None, metadata={"help": "Column holding the gold answer; detected when unset (answer, solution, …)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training problems."})
    eval_samples: int = field(
        default=64, metadata={"help": "Held-out problems graded greedily before and after training (0: skip)."}
    )
    eval_max_tokens: int | None = field(
        default=None, metadata={"help": "Token budget of the before/after evaluation (default: max_completion_length)."}
    )
    prompt_template: str = field(
        default="boxed", metadata={"help": "Prompt template: 'boxed' (answer in \\boxed{}) or 'plain'."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": "Reward functions: names from qalign.reward (accuracy, accuracy_last_number, format) "
                  "or import paths 'package.module:function' of any TRL-signature reward function."},
    )


def split_argv(argv: list[str]) -> tuple[str | None, dict[str, Any], bool]:
    """argv → (config path, overrides as a dict of raw strings/lists, help requested).

    Shared by every qalign entry point: ``--key value``, ``--key=value``, ``--flag`` (true),
    ``--key a b`` (a list), ``--section.key value`` (≡ ``section_key``)."""
    config_path, overrides, want_help = None, {}, False
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("-h", "--help"):
            want_help, i = True, i + 1
            continue
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: options look like --key value")
        key, _, inline = token[2:].partition("=")
        values = [inline] if inline else []
        i += 1
        while not inline and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if key == "config":
            if len(values) != 1:
                raise ConfigError("--config takes exactly one YAML file path")
            config_path = values[0]
            continue
        key = key.replace("-", "_").replace(".", "_")
        # A bare flag (--use_peft) means true; several values (--reward_funcs a b) are a list.
        overrides[key] = "true" if not values else values[0] if len(values) == 1 else values
    return config_path, overrides, want_help


def flatten_sections(config: dict[str, Any], sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """``{rollout: {backend: x}}`` → ``{rollout_backend: x}`` for the given section names."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in sections and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                flat[f"{key}_{sub_key}"] = sub_value
        else:
            flat[key] = value
    return flat


def load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    with file.open() as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path!r} must hold a YAML mapping of key: value, got {type(config).__name__}")
    return config


# ----------------------------------------------------------------------------- known keys


def _fingerprint() -> str:
    parts = []
    for package in ("trl", "transformers", "peft"):
        try:
            parts.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package}=none")
    package_dir = Path(__file__).parent
    sources = [package_dir / "config.py", package_dir / "rollout" / "config.py", *(package_dir / "trainers").glob("*.py")]
    for source in sorted(sources):
        parts.append(hashlib.sha1(source.read_bytes()).hexdigest())
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _cache_file() -> Path:
    root = Path(os.environ.get("QALIGN_CACHE", Path.home() / ".cache" / "qalign"))
    return root / f"config-keys-{_fingerprint()}.json"


def _compute_known_keys() -> dict[str, list[str]]:
    from trl import ModelConfig

    from qalign.trainers.registry import config_class

    shared = {f.name for cls in (QAlignArguments, RolloutArguments, ModelConfig) for f in fields(cls)}
    return {name: sorted(shared | {f.name for f in fields(config_class(name))}) for name in TRAINERS}


def known_keys() -> dict[str, list[str]]:
    """Valid keys per algorithm, from the on-disk cache when it matches the installed code."""
    cache = _cache_file()
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        keys = _compute_known_keys()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, json.dumps(keys))
        except OSError:
            pass  # a read-only home only costs speed
        return keys


def suggest(key: str, valid) -> str:
    """`` Did you mean 'a', 'b'?`` for the closest valid keys, or an empty string."""
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def validate_keys(algorithm: str, keys: list[str], source: dict[str, str]) -> None:
    """Raise ConfigError for the first key that no config class of ``algorithm`` has."""
    valid_by_algorithm = known_keys()
    valid = set(valid_by_algorithm[algorithm])
    for key in keys:
        if key in valid or key == "env":
            continue
        hint = suggest(key, valid)
        owners = [name for name, names in valid_by_algorithm.items() if key in names]
        if owners:
            hint += f" ('{key}' belongs to algorithm {', '.join(owners)}.)"
        raise ConfigError(f"unknown config key {key!r} ({source[key]}) for algorithm {algorithm!r}.{hint}")


# ----------------------------------------------------------------------------- entry point


@dataclass
class LoadedConfig:
    algorithm: str
    script: QAlignArguments
    rollout: RolloutArguments
    training: Any  # the algorithm's TRL config (a TrainingArguments subclass)
    model: Any  # trl.ModelConfig


def parse_config(argv: list[str] | None = None) -> LoadedConfig:
    """Parse ``--config X.yaml --key value …`` into the algorithm's dataclasses.

    Validation (unknown keys, algorithm, local dataset paths) runs before torch/TRL are imported.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, overrides, want_help = split_argv(argv)
    config = flatten_sections(load_yaml(config_path)) if config_path else {}
    env = config.pop("env", {}) or {}
    if not isinstance(env, dict):
        raise ConfigError(f"'env' in {config_path} must be a mapping of VARIABLE: value")
    source = {key: f"in {config_path}" for key in config} | {key: "on the command line" for key in overrides}

    algorithm = str(overrides.get("algorithm", config.get("algorithm", "grpo")))
    if algorithm not in TRAINERS:
        close = difflib.get_close_matches(algorithm, TRAINERS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown algorithm {algorithm!r}; valid: {', '.join(sorted(TRAINERS))}.{hint}")
    validate_keys(algorithm, [*config, *overrides], source)
    _check_dataset(str(overrides.get("dataset_name", config.get("dataset_name", "arithmetic"))))

    for name, value in env.items():
        os.environ[str(name)] = str(value)
    return _parse_with_trl(algorithm, config, overrides, want_help)


def _check_dataset(name: str) -> None:
    from qalign.data.sources import check_dataset_name

    check_dataset_name(name)


def _parse_with_trl(algorithm: str, config: dict, overrides: dict, want_help: bool) -> LoadedConfig:
    from trl import ModelConfig, TrlParser

    from qalign.trainers.registry import config_class

    parser = TrlParser((QAlignArguments, RolloutArguments, config_class(algorithm), ModelConfig))
    # YAML values become parser defaults (argparse converts strings such as "1e-5" by field type);
    # the command line is parsed normally on top.
    parser.set_defaults_with_config(**config)
    cli: list[str] = []
    for key, value in overrides.items():
        cli.append(f"--{key}")
        cli.extend(value if isinstance(value, list) else [value])
    if want_help:
        parser.print_help()
        raise SystemExit(0)
    script, rollout, training, model = parser.parse_args_into_dataclasses(args=cli)
    script.algorithm = algorithm
    return LoadedConfig(algorithm, script, rollout, training, model)


def main() -> None:
    """``python -m qalign.config --config X.yaml``: validate and print the resolved config."""
    loaded = parse_config()
    print(json.dumps({"algorithm": loaded.algorithm, "script": vars(loaded.script), "rollout": vars(loaded.rollout)},
                     indent=2, default=str))


if __name__ == "__main__":
    main()
