"""Checks of a training config's values that run before torch, transformers or TRL is imported.

Those imports alone take 5-15 s here, and the model and data take longer; a value that cannot work should
fail before any of it, as one line naming the key, why, and what would be valid. Two kinds of check:

- ``RULES``: the range of each numeric key, declared once (``max_steps`` is a positive step count or -1,
  ``quantile_k`` lies in (0, 1), …), applied to the raw settings (YAML values, command-line strings) of
  whichever keys the chosen algorithm takes, plus the cross-key rule of grouped sampling (a generation
  batch splits into whole groups);
- resources named by path: the model folder, a local dataset file, reward functions, the checkpoint to
  resume from.

The trainers' config classes keep their own ``__post_init__`` checks for code that builds them directly;
this module is what the command line meets first.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qalign.config import NULLS, ConfigError
from qalign.rollout.config import ONLINE_ALGORITHMS

GROUPED = ("grpo", "qae", "shiq_online")  # a group statistic (mean, std, quantile) over num_generations samples


@dataclass(frozen=True)
class Rule:
    """A numeric key's valid values: ``kind`` int or float, within bounds, or one of ``also``."""

    kind: type  # int or float
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # low itself is excluded
    high_open: bool = False
    also: tuple[Any, ...] = ()  # extra valid values (-1 for max_steps, None for an optional key)
    valid: str = ""  # how a user would say what is valid; derived from the bounds when empty

    def describe(self) -> str:
        if self.valid:
            return self.valid
        noun = "an integer" if self.kind is int else "a number"
        if self.high == math.inf:
            return f"{noun} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{noun} in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"

    def admits(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def check(self, key: str, raw: Any) -> Any:
        """``raw`` parsed as this rule's kind and in range (else ConfigError naming ``key``); the value."""
        value = parse_value(key, raw, self)
        if value is not None and value not in self.also and not self.admits(value):
            raise ConfigError(f"{key}: {value!r} is out of range; {self.describe()}")
        return value


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


POSITIVE_INT = Rule(int, low=1)
COUNT = Rule(int, low=0)
POSITIVE = Rule(float, low=0, low_open=True)
NON_NEGATIVE = Rule(float, low=0)
UNIT = Rule(float, low=0, high=1)
OPTIONAL_POSITIVE_INT = Rule(int, low=1, also=(None,), valid="an integer >= 1, or null")

RULES: dict[str, Rule] = {
    # TRL / transformers training keys
    "max_steps": Rule(int, low=1, also=(-1,), valid="a positive number of steps, or -1 to train num_train_epochs"),
    "num_train_epochs": POSITIVE,
    "learning_rate": POSITIVE,
    "per_device_train_batch_size": POSITIVE_INT,
    "per_device_eval_batch_size": POSITIVE_INT,
    "gradient_accumulation_steps": POSITIVE_INT,
    "steps_per_generation": OPTIONAL_POSITIVE_INT,
    "generation_batch_size": OPTIONAL_POSITIVE_INT,
    "num_generations": Rule(int, low=2, valid="an integer >= 2 (advantages compare samples within a group)"),
    "num_iterations": POSITIVE_INT,
    "max_completion_length": POSITIVE_INT,
    "max_prompt_length": OPTIONAL_POSITIVE_INT,
    "temperature": POSITIVE,
    "top_p": Rule(float, low=0, high=1, low_open=True),
    "min_p": Rule(float, low=0, high=1, also=(None,)),
    "warmup_ratio": UNIT,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "logging_steps": POSITIVE,
    "save_steps": POSITIVE,
    "save_total_limit": OPTIONAL_POSITIVE_INT,
    "epsilon": NON_NEGATIVE,
    "epsilon_high": Rule(float, low=0, also=(None,), valid="a number >= 0, or null"),
    "beta": NON_NEGATIVE,
    "seed": COUNT,
    # qalign's keys
    "eval_samples": COUNT,
    "eval_max_tokens": OPTIONAL_POSITIVE_INT,
    "max_train_samples": OPTIONAL_POSITIVE_INT,
    "quantile_k": Rule(
        float,
        low=0,
        high=1,
        low_open=True,
        high_open=True,
        valid="a number in (0, 1), the paper's 0.4 (for the group mean, use algorithm grpo)",
    ),
    "gamma": UNIT,
    "lam": UNIT,
    "is_clip": POSITIVE,
    "sft_coef": NON_NEGATIVE,
    "value_learning_rate": Rule(float, low=0, low_open=True, also=(None,), valid="a number > 0, or null"),
    "eta": POSITIVE,
    "guidance_top_k": POSITIVE_INT,
    "num_samples_per_prompt": POSITIVE_INT,
    "value_num_layers": Rule(int, low=1, also=(None,), valid="an integer >= 1, or null (the whole trunk)"),
    "reward_timeout": POSITIVE,
    "reward_threshold": Rule(
        float, low=-math.inf, high=math.inf, high_open=True, valid="a finite number, or -inf to keep every rollout"
    ),
    "dynamic_sampling_max_rounds": POSITIVE_INT,
    "rollout_sync_every": POSITIVE_INT,
    "rollout_num_servers": POSITIVE_INT,
    "rollout_max_retries": COUNT,
    "rollout_async_steps": COUNT,
}
# Where an algorithm narrows a shared key: β is ShiQ's and DQO's KL temperature, which divides.
ALGORITHM_RULES: dict[str, dict[str, Rule]] = {
    name: {"beta": Rule(float, low=0, low_open=True, valid="a number > 0 (the KL temperature β divides)")}
    for name in ("shiq", "shiq_online", "dqo")
}


def parse_value(key: str, raw: Any, rule: Rule) -> Any:
    """A raw setting (YAML value or command-line string) as the rule's kind; ConfigError when it is not one."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in NULLS):
        if None in rule.also:
            return None
        raise ConfigError(f"{key}: null is not a value here; {rule.describe()}")
    if isinstance(raw, bool):
        raise ConfigError(f"{key}: {raw!r} is not a number; {rule.describe()}")
    try:
        number = float(raw) if not isinstance(raw, (int, float)) else raw
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {raw!r} is not a number; {rule.describe()}") from None
    if rule.kind is int:
        if isinstance(number, float) and not number.is_integer():
            raise ConfigError(f"{key}: {raw!r} is not an integer; {rule.describe()}")
        number = int(number)
    return number


def check_fields(instance: Any, rules: Mapping[str, Rule]) -> None:
    """A config object's (already typed) fields against their rules: the same messages as the raw check."""
    for key, rule in rules.items():
        rule.check(key, getattr(instance, key))


def check_values(
    algorithm: str, settings: Mapping[str, Any], valid_keys: set[str], defaults: Mapping[str, Any]
) -> None:
    """Every key of ``RULES`` that the algorithm takes, as given or by default, then the cross-key rules.

    ``settings`` are the raw merged settings (file, caller, command line); ``defaults`` the algorithm's
    dataclass defaults (from the cached key index), used for keys the user left out."""
    rules = {**RULES, **ALGORITHM_RULES.get(algorithm, {})}
    value: dict[str, Any] = {}
    for key, rule in rules.items():
        if key not in valid_keys:
            continue
        if key in settings:
            value[key] = rule.check(key, settings[key])
        elif key in defaults:
            value[key] = rule.check(key, defaults[key])
    if algorithm in GROUPED:
        _check_groups(value)
    if value.get("rollout_async_steps") and algorithm not in ONLINE_ALGORITHMS:
        # Accepted, it would do nothing: only the online trainers sample while they train.
        raise ConfigError(f"rollout.async_steps applies to online training ({', '.join(ONLINE_ALGORITHMS)}); "
                          f"{algorithm} does not sample while it trains: leave it 0")  # fmt: skip


def _check_groups(value: Mapping[str, Any]) -> None:
    """TRL's rule, computed here so it fails before TRL loads: one generation batch holds whole groups."""
    group = value.get("num_generations")
    if group is None:
        return
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    batch = value.get("per_device_train_batch_size", 8)
    if value.get("generation_batch_size") is not None:
        generation_batch, source = value["generation_batch_size"], "generation_batch_size"
    else:
        steps = value.get("steps_per_generation") or value.get("gradient_accumulation_steps", 1)
        generation_batch = batch * steps * processes
        source = (f"per_device_train_batch_size {batch} x steps_per_generation {steps} x {processes} "
                  f"process{'es' if processes > 1 else ''}")  # fmt: skip
    if generation_batch % group:
        divisors = [d for d in range(2, generation_batch + 1) if generation_batch % d == 0]
        raise ConfigError(
            f"num_generations: {group} does not divide the generation batch of {generation_batch} completions "
            f"({source}); valid: one of {divisors}, or a batch that is a multiple of {group}"
        )


# ----------------------------------------------------------------------------- resources named by path


def looks_local(name: str) -> bool:
    """A path, not a hub id: starts like a path, or has more than the one slash of 'org/name'."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


# What marks a folder qalign can load: a transformers model, a LoRA adapter, a Q# guided policy.
MODEL_FILES = ("config.json", "adapter_config.json", "guided_policy.json")


def check_model_path(key: str, name: Any) -> None:
    """A local model folder exists and holds a model (transformers' config.json, or a LoRA adapter's)."""
    if not isinstance(name, str) or (not looks_local(name) and not Path(name).exists()):
        return  # a hub id or the embedded default's alias: checked when it loads
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: {name!r}: no such folder; give a model folder, a hub id such as "
                          f"'HuggingFaceTB/SmolLM2-135M-Instruct', or smollm2-135m-instruct (the embedded default)")  # fmt: skip
    if not path.is_dir() or not any((path / f).is_file() for f in MODEL_FILES):
        raise ConfigError(f"{key}: {name!r} is not a model folder (it has none of {', '.join(MODEL_FILES)})")


def check_dataset_file(name: Any, question_column: Any, answer_column: Any) -> None:
    """A local JSONL/JSON file is non-empty and its first row has the columns the loader will look for."""
    from qalign.data.sources import ANSWER_COLUMNS, QUESTION_COLUMNS, check_dataset_name

    if not isinstance(name, str):
        return
    check_dataset_name(name)  # a local path that does not exist
    path = Path(name).expanduser()
    if not path.is_file() or path.suffix not in (".jsonl", ".json"):
        return  # folders, parquet and hub ids are checked when they load
    first = _first_json_row(path)
    if first is _UNCHECKED:
        return
    if first is None:
        raise ConfigError(f"dataset_name: {name!r} has no rows; give a file with one problem per line")
    if not isinstance(first, dict):
        raise ConfigError(f"dataset_name: {name!r}: a row is a {type(first).__name__}, not a mapping of column: value")
    from qalign.data.formats import conversational_column

    if conversational_column(first) is not None:  # TRL's conversational format: messages are the prompt
        return
    for key, chosen, candidates in (("question_column", question_column, QUESTION_COLUMNS),
                                    ("answer_column", answer_column, ANSWER_COLUMNS)):  # fmt: skip
        names = [chosen] if chosen not in (None, *NULLS) else list(candidates)
        if not any(column in first for column in names):
            raise ConfigError(f"dataset_name: {name!r} has no column {' or '.join(map(repr, names))}; its columns "
                              f"are {sorted(first)}: set {key} to one of them")  # fmt: skip


_UNCHECKED = object()


def _first_json_row(path: Path) -> Any:
    if path.suffix == ".jsonl":
        with path.open() as handle:
            for line_number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        return json.loads(line)
                    except ValueError as error:
                        raise ConfigError(
                            f"dataset_name: {str(path)!r} line {line_number} is not JSON: {error}"
                        ) from None
        return None
    try:
        data = json.loads(path.read_text() or "null")
    except ValueError as error:
        raise ConfigError(f"dataset_name: {str(path)!r} is not JSON: {error}") from None
    if isinstance(data, list):
        return data[0] if data else None
    return _UNCHECKED  # {"data": [...]} and column-oriented files: the loader reads them


def check_reward_functions(names: Any) -> None:
    """Every reward function resolves (registry name or import path) and takes TRL's keyword arguments."""
    from qalign.reward.functions import REWARD_FUNCTIONS, get_reward_functions

    names = [names] if isinstance(names, str) else list(names or [])
    try:
        functions = get_reward_functions(names)
    except ValueError as error:
        raise ConfigError(f"reward_funcs: {error}") from None
    for name, function in zip(names, functions, strict=True):
        if name in REWARD_FUNCTIONS:
            continue
        try:
            parameters = inspect.signature(getattr(function, "__wrapped__", function)).parameters.values()
        except (TypeError, ValueError):
            continue  # a builtin or C callable: nothing to inspect
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            raise ConfigError(f"reward_funcs: {name!r} does not take **kwargs; TRL calls a reward function as "
                              f"f(prompts=..., completions=..., completion_ids=..., **dataset_columns)")  # fmt: skip


def check_resume(value: Any, output_dir: Any) -> None:
    """``resume_from_checkpoint``: a given folder exists and holds a checkpoint (true: the latest one in output_dir)."""
    if value is None or isinstance(value, bool) or str(value).strip().lower() in ("true", "false", *NULLS):
        return
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"resume_from_checkpoint: {str(value)!r}: no such folder; give a checkpoint-<step> "
                          f"folder, or true for the latest checkpoint in output_dir ({output_dir})")  # fmt: skip
    from qalign.checkpoints import check_checkpoint

    # No trainer_state.json, or a file cut short by a kill or a full disk: named now, not in a traceback.
    check_checkpoint(path)


ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")  # when no list is given


def check_model_options(settings: Mapping[str, Any], attention_kinds: Sequence[str] = ATTENTION) -> None:
    """TRL's ModelConfig options that cannot apply here fail now, not after the model starts loading."""
    import importlib.util

    truthy = lambda key: str(settings.get(key, False)).strip().lower() in ("true", "1", "yes")
    if truthy("load_in_4bit") and truthy("load_in_8bit"):
        raise ConfigError("load_in_4bit and load_in_8bit: choose one")
    for key in ("load_in_4bit", "load_in_8bit"):
        if truthy(key) and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{key}: k-bit loading needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; "
                              f"this environment has no bitsandbytes")  # fmt: skip
    attention = settings.get("attn_implementation")
    if attention in (None, "", "null", "none"):
        return
    attention = str(attention)
    if attention not in attention_kinds and "/" not in attention:  # "org/kernel": a hub kernel, checked at load
        raise ConfigError(f"attn_implementation: {attention!r} is not one of {', '.join(attention_kinds)} "
                          f"(or a hub kernel 'org/name')")  # fmt: skip
    needs = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(attention)
    if needs is not None and importlib.util.find_spec(needs) is None:
        raise ConfigError(f"attn_implementation: {attention} needs the {needs} package (and a CUDA GPU); "
                          f"use sdpa or eager here")  # fmt: skip


def check_training_settings(
    algorithm: str,
    settings: Mapping[str, Any],
    valid_keys: set[str],
    defaults: Mapping[str, Any],
    attention_kinds: Sequence[str] = ATTENTION,
) -> None:
    """All of the above for one training config's raw settings (``attention_kinds``: what the installed
    transformers accepts as ``attn_implementation``, from the cached key index)."""
    check_values(algorithm, settings, valid_keys, defaults)
    check_model_options(settings, attention_kinds)
    for key in ("model_name_or_path", "value_model_name_or_path", "reference_model_name_or_path"):
        if key in settings:
            check_model_path(key, settings[key])
    check_dataset_file(settings.get("dataset_name"), settings.get("question_column"), settings.get("answer_column"))
    if "reward_funcs" in settings:
        check_reward_functions(settings["reward_funcs"])
    check_resume(settings.get("resume_from_checkpoint"), settings.get("output_dir"))
