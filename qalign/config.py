"""The one config loader: ``--config X.yaml`` plus ``--key value`` overrides into a command's dataclasses.

Every command (train, collect, eval, probe, compare) describes its config with a ``ConfigSpec`` and calls
``load_config``, so they share one syntax, one unknown-key check, one value conversion and one error line:

- safe YAML; sections named by the spec flatten with their name as prefix
  (``rollout: {backend: vllm}`` ≡ ``rollout_backend: vllm`` ≡ ``--rollout.backend vllm``);
- ``--key value``, ``--key=value``, a bare ``--flag`` (true), ``--key a b`` (a list);
- a YAML ``env:`` mapping sets environment variables before anything heavy is imported;
- unknown keys fail first, naming where the key came from and the closest valid ones;
- values take their field's type (``convert``); a dataclass-typed field is a section of its own
  (``heldout: {n: 4}`` ≡ ``--heldout.n 4``);
- TRL's own dataclasses (``ConfigSpec.trl_classes``) are filled by TRL's parser after the check, so
  every TRL/transformers field keeps its TRL meaning;
- ``ConfigSpec.check_values`` checks the values themselves before anything is built (training: ranges,
  paths, reward functions; ``qalign.preflight``);
- ``exit_on_config_error`` turns any of these failures into one line, ``qalign: …``, and exit status 2.

This module imports no qalign command: each command passes what it knows (its classes, its valid keys) in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ENV_KEY = "env"  # a YAML mapping of environment variables, never a field
DEBUG_ENV = "QALIGN_DEBUG"  # set (or --debug): user errors show their traceback
NULLS = ("null", "none", "~")  # command-line spellings of None


class ConfigError(ValueError):
    """A config the user can fix: the message names the bad key/value and what would be valid."""


@dataclass(frozen=True)
class ConfigSpec:
    """What one command's config is made of."""

    name: str  # names the config in messages: "unknown {name} config key …"
    classes: tuple[type, ...]  # qalign's dataclasses, filled by ``convert``, returned first and in order
    sections: tuple[str, ...] = ()  # YAML sections that flatten into prefixed keys
    # TRL/transformers dataclasses, returned after ``classes``. A function, so that importing TRL (~5 s)
    # waits until the keys have passed the check.
    trl_classes: Callable[[], tuple[type, ...]] | None = None
    # Every key the command takes, when ``classes`` are not all of them (training: a cached index of the
    # TRL fields too); default: the fields of ``classes``.
    valid_keys: Collection[str] | None = None
    key_hint: Callable[[str], str] | None = None  # more words for an unknown key (training: who has it)
    usage: str = ""
    # Value checks on the raw merged settings, run after the key check and before any class is built or TRL
    # imported (training: ``qalign.preflight``); raises ConfigError.
    check_values: Callable[[Mapping[str, Any]], None] | None = None
    # The whole ``--help`` text when the command builds it itself (training: from the cached key index, so
    # that help needs no TRL import); default: qalign's classes, then TRL's parser's help.
    help_text: Callable[[], str] | None = None


# ----------------------------------------------------------------------------- reading


def split_argv(argv: Sequence[str]) -> tuple[str | None, dict[str, Any], bool]:
    """argv → (config path, overrides as a dict of raw strings/lists, help requested).

    ``--key value``, ``--key=value``, ``--flag`` (true), ``--key a b`` (a list),
    ``--section.key value`` (≡ ``section_key``)."""
    config_path, overrides, want_help = None, {}, False
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("-h", "--help"):
            want_help, i = True, i + 1
            continue
        if token == "--debug":  # a user error then shows its traceback too
            os.environ[DEBUG_ENV] = "1"
            i += 1
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


def flatten_sections(config: Mapping[str, Any], sections: Iterable[str]) -> dict[str, Any]:
    """``{rollout: {backend: x}}`` → ``{rollout_backend: x}`` for the given section names (an empty
    section, which YAML reads as null, adds nothing)."""
    sections = tuple(sections)
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in sections and (value is None or isinstance(value, dict)):
            for sub_key, sub_value in (value or {}).items():
                flat[f"{key}_{sub_key}"] = sub_value
        else:
            flat[key] = value
    return flat


def load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    with file.open() as handle:
        try:
            config = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            what = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"config file {path!r} is not valid YAML:{where}: {what}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path!r} must hold a YAML mapping of key: value, got {type(config).__name__}")
    return config


# ----------------------------------------------------------------------------- checking keys


def suggest(key: str, valid: Iterable[str]) -> str:
    """`` Did you mean 'a', 'b'?`` for the closest valid keys, or an empty string."""
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def check_keys(
    name: str,
    keys: Iterable[str],
    valid: Collection[str],
    source: Mapping[str, str],
    hint: Callable[[str], str] | None = None,
) -> None:
    """Raise ConfigError for the first key not in ``valid``: where it came from and the closest valid keys."""
    for key in keys:
        if key not in valid:
            extra = hint(key) if hint else ""
            raise ConfigError(f"unknown {name} config key {key!r} ({source[key]}).{suggest(key, valid)}{extra}")


def field_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Flat key → type of every init field; a dataclass-typed field contributes its own fields, prefixed."""
    hints = typing.get_type_hints(cls)
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if _is_dataclass_type(hints[f.name]):
            flat.update(field_types(hints[f.name], f"{prefix}{f.name}_"))
        else:
            flat[prefix + f.name] = hints[f.name]
    return flat


def _is_dataclass_type(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


# ----------------------------------------------------------------------------- converting values


def convert(key: str, value: Any, annotation: Any, from_cli: bool) -> Any:
    """``value`` (a YAML value, or a raw command-line string/list) as the field type ``annotation``.

    A string for a non-string field is read as a YAML scalar (``8`` → 8, ``true`` → True), and a float
    field also takes ``1e-5`` (YAML 1.1 reads it as a string). On the command line ``null``/``none``/``~``
    is None for an optional field, and one ``[a, b]`` string is a YAML list.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_cli and isinstance(value, str) and value.lower() in NULLS):
            return None
        return convert(key, value, next(a for a in args if a is not type(None)), from_cli)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        if from_cli and len(items) == 1 and isinstance(items[0], str) and items[0].startswith("["):
            parsed = yaml_scalar(items[0])  # --k_values "[1, 4]"
            items = parsed if isinstance(parsed, list) else items
        return [convert(key, item, args[0] if args else Any, from_cli) for item in items]
    if origin is dict or annotation is dict:
        return _convert_mapping(key, value, args[1] if len(args) == 2 else Any)
    if annotation is Any:
        return value
    if isinstance(value, str) and annotation is not str:
        value = yaml_scalar(value)
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            return float(value)
    if annotation is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def yaml_scalar(text: str) -> Any:
    """``text`` as YAML reads it (``8`` → 8, ``null`` → None), or unchanged when it is not valid YAML."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _convert_mapping(key: str, value: Any, value_type: Any) -> dict[str, Any]:
    """A YAML mapping, or ``name=value`` items from the command line (``--data_files gsm8k=path``).

    Values are converted only to scalar types: deeper structure (a comparison's method sections) is the
    command's own to check."""
    scalar = value_type in (str, int, float, bool)
    if isinstance(value, dict):
        return {str(k): convert(f"{key}.{k}", v, value_type, False) if scalar else v for k, v in value.items()}
    mapping: dict[str, Any] = {}
    for item in value if isinstance(value, list) else [value]:
        name, sep, text = str(item).partition("=")
        if not sep or not name:
            raise ConfigError(f"{key}: expected name=value items (e.g. --{key} gsm8k=data/test.jsonl), got {item!r}")
        if scalar:
            mapping[name] = convert(f"{key}.{name}", text, value_type, True)
        else:  # dict[str, Any] (chat_template_kwargs): a YAML scalar, so that enable_thinking=false is False
            mapping[name] = yaml_scalar(text) if value_type is Any else text
    return mapping


def _build(name: str, cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """``cls`` from converted flat values; a value the class refuses becomes a ConfigError naming it."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if not f.init:
            continue
        if _is_dataclass_type(hints[f.name]):
            if any(k.startswith(f"{key}_") for k in values):
                kwargs[f.name] = _build(name, hints[f.name], values, f"{key}_")
        elif key in values:
            kwargs[f.name] = values[key]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{name} config needs {key!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:  # a __post_init__ check (beta <= 0, …): its message names the key
        raise ConfigError(str(error)) from None


def _parse_with_trl(classes: tuple[type, ...], file_values: dict[str, Any], cli: dict[str, Any]) -> tuple[Any, ...]:
    """TRL's dataclasses through TRL's parser: YAML values become its defaults, the command line goes on top."""
    from trl import TrlParser

    parser = TrlParser(classes)

    def fail(message: str) -> typing.NoReturn:
        raise ConfigError(message)  # argparse would print its usage and exit; one line instead

    parser.error = fail
    parser.set_defaults_with_config(**file_values)  # argparse converts string defaults ("1e-5") by type
    args: list[str] = []
    for key, value in cli.items():
        args += [f"--{key}", *(value if isinstance(value, list) else [value])]
    try:
        return tuple(parser.parse_args_into_dataclasses(args=args))
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from None


# ----------------------------------------------------------------------------- the loader


def load_config(
    argv: Sequence[str],
    spec: ConfigSpec | Callable[[Mapping[str, Any]], ConfigSpec],
    values: Mapping[str, Any] | None = None,
) -> tuple[Any, ...]:
    """``--config X.yaml --key value …`` → the spec's dataclasses (``classes``, then ``trl_classes``).

    ``spec`` may be a function of the raw settings when they choose it (training: ``algorithm``).
    ``values`` are settings from code, over the YAML file and under the command line. Raises ConfigError
    (FileNotFoundError for a missing data path a class checks); ``--help`` prints the keys and exits.
    """
    config_path, cli, want_help = split_argv(argv)
    from_file = load_yaml(config_path) if config_path else {}
    env = from_file.pop(ENV_KEY, None) or {}
    if not isinstance(env, dict):
        raise ConfigError(f"'{ENV_KEY}' in {config_path} must be a mapping of VARIABLE: value")
    from_code = dict(values or {})
    if not isinstance(spec, ConfigSpec):
        spec = spec({**from_file, **from_code, **cli})
    if want_help:
        print_help(spec)
        raise SystemExit(0)
    from_file = flatten_sections(from_file, spec.sections)
    from_code = flatten_sections(from_code, spec.sections)
    source = ({k: f"in {config_path}" for k in from_file} | {k: "from the caller" for k in from_code}
              | {k: "on the command line" for k in cli})  # fmt: skip
    types_ = {k: t for cls in spec.classes for k, t in field_types(cls).items()}
    valid = set(types_) if spec.valid_keys is None else spec.valid_keys
    check_keys(spec.name, source, valid, source, spec.key_hint)
    for variable, value in env.items():  # before TRL/torch import: some variables are read at import
        os.environ[str(variable)] = str(value)

    converted = {k: convert(k, v, types_[k], from_cli=False) for k, v in {**from_file, **from_code}.items()
                 if k in types_}  # fmt: skip
    for key, value in cli.items():
        if key in types_:
            value = convert(key, value, types_[key], from_cli=True)
            # --data_files gsm8k=x adds to (or replaces one entry of) the YAML mapping.
            converted[key] = {**converted.get(key, {}), **value} if isinstance(value, dict) else value
    if spec.check_values is not None:  # qalign's keys typed, TRL's as given (YAML values, command-line strings)
        spec.check_values({**from_file, **from_code, **cli, **converted})
    built = tuple(_build(spec.name, cls, converted) for cls in spec.classes)
    if spec.trl_classes is None:
        return built
    rest = {k: v for k, v in {**from_file, **from_code}.items() if k not in types_}
    return built + _parse_with_trl(spec.trl_classes(), rest, {k: v for k, v in cli.items() if k not in types_})


def print_help(spec: ConfigSpec) -> None:
    """Every key of qalign's classes with its default and help, then TRL's help for its classes."""
    if spec.help_text is not None:
        print(spec.help_text())
        return
    lines = [spec.usage or "usage: --config X.yaml [--key value ...]", "", "keys:"]
    for cls in spec.classes:
        lines += _help_lines(cls)
    print("\n".join(lines))
    if spec.trl_classes is not None:
        from trl import TrlParser

        print()
        TrlParser(spec.trl_classes()).print_help()


def _help_lines(cls: type, prefix: str = "") -> list[str]:
    """A class's own fields before inherited ones (eval's keys before its ``rollout_*`` ones); a
    dataclass-typed field as its section's keys (``--heldout.n``)."""
    hints = typing.get_type_hints(cls)
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    lines: list[str] = []
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited):
        if not f.init:
            continue
        if _is_dataclass_type(hints[f.name]):
            lines += _help_lines(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = "required" if default is dataclasses.MISSING else f"default {default!r}"
        text = f.metadata.get("help")
        lines.append(f"  --{prefix}{f.name} ({default})" + (f": {text}" if text else ""))
    return lines


@contextlib.contextmanager
def exit_on_config_error(
    catch: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError),
) -> Iterator[None]:
    """Inside: a user error ends the command with one line, ``qalign: <what>: <why>; <what is valid>``, on
    stderr and exit status 2, never a traceback (``--debug`` or QALIGN_DEBUG=1 re-raises it).

    By default any ValueError or missing file counts, which is right while a config is parsed (its classes
    refuse values with ValueError); around work that follows, pass ``catch=(ConfigError,)`` so that only
    the errors written for a user are shortened, never a bug's."""
    try:
        yield
    except catch as error:
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            raise
        message = " ".join(str(error).split("\n")).strip() or type(error).__name__
        print(f"qalign: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
