"""The training command's config: qalign's own keys, the algorithm's TRL config, and the fast key check.

``algorithm:`` picks the trainer config class from the registry; every TRL/transformers training field
works under its own name (filled by TRL's parser inside ``qalign.config.load_config``).

Unknown keys fail *before* torch or TRL are imported (those imports alone take ~5 s): the set of valid
keys per algorithm is cached on disk, keyed by the installed TRL/transformers/peft versions and the source
of qalign's config classes, so a stale cache cannot reject a real field.

Part of the train entry point: it reads the trainers registry, and only entry points import it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from qalign.atomic import write_atomic
from qalign.config import ConfigError, ConfigSpec, check_keys, exit_on_config_error, load_config
from qalign.rollout.config import RolloutArguments, SamplingRolloutArguments, check_async_steps
from qalign.trainers.registry import TRAINERS, config_class

# YAML sections of a training config that flatten into prefixed fields (``reward: {funcs: …}`` ≡ reward_funcs).
SECTIONS = ("rollout", "reward")
# Algorithms whose engine only samples a fixed π_ref (no weight sync): rollout.backend defaults to auto.
SAMPLING_ONLY = ("qsharp",)


def rollout_class(algorithm: str) -> type[RolloutArguments]:
    """The ``rollout:`` section of ``algorithm``: ``auto`` by default where the engine only samples π_ref
    (Q#'s collection), ``hf`` for online training (its engine takes a weight sync every step)."""
    return SamplingRolloutArguments if algorithm in SAMPLING_ONLY else RolloutArguments


@dataclass
class QAlignArguments:
    """What to train on and how to judge it; the trainer's own knobs live in its config class."""

    algorithm: str = field(default="grpo", metadata={"help": f"Trainer to run: one of {sorted(TRAINERS)}."})
    dataset_name: str = field(
        default="arithmetic",
        metadata={
            "help": "Bundled task name ('arithmetic'), a hub dataset id (e.g. openai/gsm8k), or a local "
            ".jsonl/.json/.parquet file or a folder of <split>.jsonl/<split>.parquet files."
        },
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
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System message of every prompt (through the chat template; plain text first otherwise)."},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={
            "help": "Reward functions: names from qalign.reward (accuracy, accuracy_last_number, format) "
            "or import paths 'package.module:function' of any TRL-signature reward function."
        },
    )

    reward_timeout: float = field(
        default=60.0,
        metadata={
            "help": "Seconds a reward function given by import path may take per call; a call past it, or a "
            "completion it raises on, scores None (TRL: left out of the reward sum) and the run goes on."
        },
    )

    def __post_init__(self) -> None:
        from qalign.data.sources import check_dataset_name

        # A local dataset path that does not exist fails here, before TRL is even imported.
        check_dataset_name(self.dataset_name)


# ----------------------------------------------------------------------------- known keys


def _fingerprint() -> str:
    parts = []
    for package in ("trl", "transformers", "peft"):
        try:
            parts.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package}=none")
    package_dir = Path(__file__).parent
    sources = [Path(__file__), package_dir / "rollout" / "config.py", package_dir / "preflight.py",
               *(package_dir / "trainers").glob("*.py")]  # fmt: skip
    for source in sorted(sources):
        parts.append(hashlib.sha1(source.read_bytes()).hexdigest())
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _cache_file() -> Path:
    root = Path(os.environ.get("QALIGN_CACHE", Path.home() / ".cache" / "qalign"))
    return root / f"config-keys-{_fingerprint()}.json"


def _compute_index() -> dict[str, dict[str, Any]]:
    """Per algorithm: its valid keys, the defaults of the keys ``qalign.preflight`` checks, and the help
    lines of ``--help`` by group, so that neither a typo nor ``--help`` has to import TRL."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from trl import ModelConfig

    from qalign.preflight import RULES

    index: dict[str, Any] = {"keys": {}, "defaults": {}, "help": {},
                             "attention": ["eager", *sorted(ALL_ATTENTION_FUNCTIONS.valid_keys())]}  # fmt: skip
    for name in TRAINERS:
        trainer_config = config_class(name)
        rollout = rollout_class(name)
        classes = (QAlignArguments, rollout, ModelConfig, trainer_config)
        all_fields = [f for cls in classes for f in fields(cls)]
        index["keys"][name] = sorted({f.name for f in all_fields})
        index["defaults"][name] = {f.name: f.default for f in all_fields
                                   if f.name in RULES and isinstance(f.default, (int, float, type(None)))}  # fmt: skip
        groups = [("qalign", QAlignArguments), ("rollout", rollout), (name, trainer_config),
                  ("training (TRL / transformers)", trainer_config), ("model (trl.ModelConfig)", ModelConfig)]  # fmt: skip
        lines, seen = [], set()
        for group, cls in groups:
            for f in fields(cls):
                own = _defined_in_qalign(cls, f.name)
                if f.name in seen or not f.init or (cls is trainer_config and own != (group == name)):
                    continue
                seen.add(f.name)
                key = f"rollout.{f.name.removeprefix('rollout_')}" if cls is rollout else f.name
                lines.append([group, key, _default_text(f), " ".join(str(f.metadata.get("help", "")).split())])
        index["help"][name] = lines
    return index


def _defined_in_qalign(cls: type, name: str) -> bool:
    """Whether the class in ``cls``'s MRO that declares field ``name`` is qalign's (not TRL's/transformers')."""
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return klass.__module__.startswith("qalign")
    return False


def _default_text(f: Any) -> str:
    import dataclasses

    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required" if f.default is dataclasses.MISSING else repr(f.default)


def train_help(algorithm: str) -> str:
    """``qalign train --help``: usage, then the algorithm's keys by group, from the cached index."""
    out = ["usage: qalign train --config X.yaml [--key value ...]   (or: python -m qalign.train …)",
           f"       algorithm: {algorithm}  (another's keys: --algorithm NAME --help; "
           f"algorithms: {', '.join(sorted(TRAINERS))})",
           "  A YAML file gives keys as `key: value` (sections `rollout:` and `reward:` nest); the command line",
           "  overrides it. `--debug` shows a traceback on errors. `qalign config --config X.yaml` prints it resolved."]  # fmt: skip
    group = None
    for line_group, key, default, text in _index()["help"][algorithm]:
        if line_group != group:
            group = line_group
            out += ["", f"{group}:"]
        out.append(f"  --{key} (default {default})" + (f": {text}" if text else ""))
    return "\n".join(out)


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """stdout and stderr to /dev/null at the file-descriptor level (libraries' handlers hold their own streams)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


@functools.cache  # one read per process: a parse asks for the keys, the defaults and the attention names
def _index() -> dict[str, dict[str, Any]]:
    """The key index, from the on-disk cache when it matches the installed code."""
    cache = _cache_file()
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        with _quiet_fds():  # TRL's import prints library warnings; a config error should be one line
            index = _compute_index()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, json.dumps(index))
        except OSError:
            pass  # a read-only home only costs speed
        return index


def known_keys() -> dict[str, list[str]]:
    """Valid keys per algorithm (from the cached index)."""
    return _index()["keys"]


def known_defaults(algorithm: str) -> dict[str, Any]:
    """The algorithm's defaults of the keys ``qalign.preflight`` checks (from the cached index)."""
    return _index()["defaults"][algorithm]


def known_attention() -> list[str]:
    """The ``attn_implementation`` values the installed transformers accepts (from the cached index)."""
    return _index()["attention"]


def _owners_hint(valid_by_algorithm: dict[str, list[str]]) -> Callable[[str], str]:
    """Names the algorithms that do take a key the chosen one lacks (``quantile_k`` under grpo)."""

    def hint(key: str) -> str:
        owners = [name for name, names in valid_by_algorithm.items() if key in names]
        return f" ('{key}' belongs to algorithm {', '.join(owners)}.)" if owners else ""

    return hint


def validate_keys(algorithm: str, keys: list[str], source: dict[str, str]) -> None:
    """The fast check alone, for a merged config that is not loaded here (each method of a comparison)."""
    valid_by_algorithm = known_keys()
    keys = [key for key in keys if key != "env"]  # environment variables, never a field
    check_keys(algorithm, keys, set(valid_by_algorithm[algorithm]), source, _owners_hint(valid_by_algorithm))


def validate_values(algorithm: str, settings: Mapping[str, Any]) -> None:
    """The value checks alone (``qalign.preflight``), for a merged config that is not loaded here."""
    from qalign.preflight import check_training_settings

    valid = set(known_keys()[algorithm])
    check_training_settings(algorithm, {k: v for k, v in settings.items() if k != "env"}, valid,
                            known_defaults(algorithm), known_attention())  # fmt: skip


def train_spec(settings: dict[str, Any]) -> ConfigSpec:
    """The config of the algorithm ``settings`` names: qalign's classes, then the trainer's TRL config and
    ``trl.ModelConfig``; valid keys from the cached index, so a typo fails before TRL is imported."""
    algorithm = str(settings.get("algorithm", "grpo"))
    if algorithm not in TRAINERS:
        close = difflib.get_close_matches(algorithm, TRAINERS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown algorithm {algorithm!r}; valid: {', '.join(sorted(TRAINERS))}.{hint}")
    valid_by_algorithm = known_keys()

    def trl_classes() -> tuple[type, ...]:
        from trl import ModelConfig

        return config_class(algorithm), ModelConfig

    valid = set(valid_by_algorithm[algorithm])

    def check_values(settings: Mapping[str, Any]) -> None:
        from qalign.preflight import check_training_settings

        check_training_settings(algorithm, settings, valid, known_defaults(algorithm), known_attention())

    return ConfigSpec(
        name=algorithm, classes=(QAlignArguments, rollout_class(algorithm)), sections=SECTIONS, trl_classes=trl_classes,
        valid_keys=valid, key_hint=_owners_hint(valid_by_algorithm), check_values=check_values,
        help_text=lambda: train_help(algorithm),
        usage="usage: python -m qalign.train --config X.yaml [--key value ...]  (qalign's keys, then TRL's)",
    )  # fmt: skip


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
    script, rollout, training, model = load_config(argv, train_spec)
    from qalign.rollout.backend import resolve_backend

    # auto → an engine, once, here: nothing past this line compares against "auto".
    recorded = recorded_collection_backend(script.algorithm, training)
    rollout.rollout_backend = resolve_backend(rollout.rollout_backend, recorded=recorded)
    try:
        check_async_steps(rollout.rollout_async_steps, rollout.rollout_backend)  # auto may have become hf
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return LoadedConfig(script.algorithm, script, rollout, training, model)


def recorded_collection_backend(algorithm: str, training: Any) -> str | None:
    """The engine a resumed Q# run's collected roll-outs record (``ref_backend`` in their settings; absent:
    hf), so that ``auto`` resumes it on the same engine; None for other algorithms or a fresh run."""
    from qalign.rollout.backend import recorded_backend

    if algorithm not in SAMPLING_ONLY:
        return None
    data_dir = Path(getattr(training, "data_dir", None) or Path(training.output_dir) / "qsharp_data")
    stores = sorted(data_dir.glob("iter*.rank*.meta.json"))
    return recorded_backend(stores, lambda meta: meta["policy"].get("ref_backend", "hf"))


def resolved_yaml(loaded: LoadedConfig, argv: Sequence[str]) -> str:
    """The config as YAML that reruns it: every key the file or the command line set, with the value the
    parsed config holds (typed, enums as their values), sections nested; the rest are defaults."""
    import enum

    import yaml

    from qalign.config import ENV_KEY, flatten_sections, load_yaml, split_argv

    config_path, cli, _ = split_argv(argv)
    from_file = load_yaml(config_path) if config_path else {}
    env = from_file.pop(ENV_KEY, None)
    keys = list(dict.fromkeys([*flatten_sections(from_file, SECTIONS), *cli]))
    objects = (loaded.script, loaded.rollout, loaded.training, loaded.model)

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)

    out: dict[str, Any] = {"algorithm": loaded.algorithm}
    for key in keys:
        owner = next((obj for obj in objects if hasattr(obj, key)), None)
        if owner is None or key == "algorithm":
            continue
        section = "rollout" if key.startswith("rollout_") else None  # rollout.* nests; reward_funcs stays flat
        if section is None:
            out[key] = plain(getattr(owner, key))
        else:
            out.setdefault(section, {})[key.removeprefix(f"{section}_")] = plain(getattr(owner, key))
    if env:
        out[ENV_KEY] = env
    header = (
        f"# qalign config, resolved ({loaded.algorithm}); keys not listed keep their defaults (qalign train --help)\n"
    )
    return header + yaml.safe_dump(out, sort_keys=False, allow_unicode=True)


def main(argv: Sequence[str] | None = None) -> None:
    """``qalign config --config X.yaml [--key value …]``: check the config as ``qalign train`` would and print
    it resolved, as YAML that ``qalign train --config`` reruns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with exit_on_config_error():
        loaded = parse_config(argv)
        print(resolved_yaml(loaded, argv), end="")


if __name__ == "__main__":
    main()
