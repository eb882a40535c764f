"""The comparison's config: one task, one training-sample budget, one held-out set, a list of methods.

YAML layout (``configs/compare_demo.yaml`` is a full example)::

    output_dir: outputs/compare_demo
    budget: 512              # completions each method samples for training
    shared: {...}            # qalign.train keys every method starts from (model, data, template, rewards…)
    heldout: {problems: 256, n: 4, temperature: 0.7, ...}
    offline: {num_samples: 4, temperature: 0.7}   # the one collection shiq, dqo and rft train on
    methods:
      reference: {}                       # π_ref untouched
      grpo: {learning_rate: 2.0e-5}       # a section's keys override `shared`
      grpo_lr1e-5: {method: grpo, learning_rate: 1.0e-5}   # `method:` when the name is not a method

How the budget becomes each method's size (``plan_method``):
- online (grpo, qae, shiq_online): ``max_steps = budget / completions per step``, where a step samples
  ``per_device_train_batch_size × gradient_accumulation_steps`` completions (one process);
- offline (shiq, dqo, rft): one collection of ``budget / offline.num_samples`` prompts, shared by all three,
  so each is charged the same ``budget`` completions;
- guided (qsharp, cd): ``max_train_samples = budget / (num_iterations × num_samples_per_prompt)`` prompts
  per iteration (each roll-in/roll-out pair is one completion);
- qprobe: ``num_train_prompts = budget / samples_per_prompt`` (k samples of π_ref per prompt train the
  probe); at test time best-of-k draws k samples per held-out problem, reported as test-time compute;
- reference: nothing to train.
A budget that does not divide evenly is an error naming the numbers, never a silent rounding.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qalign.config import (
    ConfigError,
    ConfigSpec,
    check_keys,
    flatten_sections,
    load_config,
    split_argv,
    yaml_scalar,
)
from qalign.train_config import SECTIONS as TRAIN_SECTIONS
from qalign.train_config import validate_keys, validate_values

ONLINE = ("grpo", "qae", "shiq_online")
OFFLINE = ("shiq", "dqo", "rft")
GUIDED = ("qsharp", "cd")
METHODS = ("reference", *ONLINE, *OFFLINE, *GUIDED, "qprobe")
PROBE_SECTIONS = ("sampler", "embedder", "probe")  # a qprobe section is written like a qalign.probe config
# qalign.probe keys the comparison sets itself for qprobe.
PROBE_PLANNED = ("output_dir", "num_train_prompts", "num_test_prompts", "test_split", "test_data_file", "k_values",
                 "betas", "losses")  # fmt: skip
TRAINED_BY = {**{m: m for m in ONLINE + OFFLINE}, "qsharp": "qsharp", "cd": "qsharp"}
# qalign.train keys that the comparison sets itself: a method section may not override them.
PLANNED_KEYS = ("algorithm", "output_dir", "eval_samples", "max_steps", "rollouts_path", "collect_config",
                "max_train_samples", "guidance")  # fmt: skip
# TRL/transformers defaults the planner needs when a config leaves them out.
DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_iterations": 2,
            "num_samples_per_prompt": 4}  # fmt: skip


@dataclass
class HeldoutConfig:
    """The held-out problems every method is graded on, and how."""

    benchmark: str = "arithmetic"  # a qalign.eval benchmark (its test split): arithmetic, gsm8k, math500, …
    data_file: str | None = None  # local copy of the benchmark (else bundled / the hub)
    # "test": the benchmark's test split, for the final numbers. "validation": the last `problems` problems
    # of the training split, which every method is then kept from training on: for choosing recipes.
    split: str = "test"
    problems: int = 256
    n: int = 4  # samples per problem for mean@n (sampled accuracy)
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int | None = None  # default: shared max_completion_length
    batch_size: int = 32
    # The sampler of every policy, Q#'s guided ones included (auto | hf | vllm; auto: qalign.rollout.backend's
    # rule, resolved once per comparison by run_compare).
    rollout_backend: str = "auto"
    kl_problems: int = 64  # held-out prompts whose T=1 samples the KL to π_ref is measured on
    seed: int = 0


@dataclass
class OfflineDataConfig:
    """The single offline collection (π_ref's samples) that every offline method trains on."""

    num_samples: int = 4
    temperature: float = 0.7
    top_p: float = 1.0


@dataclass
class MethodPlan:
    """One method of the comparison: what to run and what it costs."""

    name: str
    method: str
    train_config: dict[str, Any] | None  # the entry point's keys (None: nothing to train)
    samples: int  # training completions charged to the method
    note: str = ""
    entry: str = "qalign.train"  # the command that trains it (qprobe: qalign.probe)


@dataclass
class CompareConfig:
    output_dir: str
    budget: int
    shared: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    offline: OfflineDataConfig = field(default_factory=OfflineDataConfig)
    confidence: float = 0.95
    curve_points: int = 0  # intermediate checkpoints of online methods evaluated for curves.png
    # Run just these methods now (``--only grpo,shiq``); the others keep what they have. Two comparisons
    # over one output_dir with disjoint ``only`` lists can share a machine's cores; a final run without
    # it reruns nothing and reports every method.
    only: list[str] = field(default_factory=list)
    # Trackers that get the report's numbers (each method's accuracies, truncation and KL); the methods'
    # own training runs report through shared.report_to.
    report_to: list[str] = field(default_factory=lambda: ["none"])
    source: str = field(default="", init=False)  # the YAML file (and --shared.* keys), for the report; not a key

    @property
    def root(self) -> Path:
        return Path(self.output_dir)

    @property
    def reference_model(self) -> str:
        """π_ref: the model every method starts from (qalign.train's default when ``shared`` names none)."""
        return str(self.shared.get("model_name_or_path", "smollm2-135m-instruct"))

    @property
    def dtype(self) -> str:
        return str(self.shared.get("dtype", "float32"))

    @property
    def max_tokens(self) -> int:
        return int(self.heldout.max_tokens or self.shared.get("max_completion_length", 256))


USAGE = (
    "usage: python -m qalign.compare --config COMPARE.yaml [--output_dir DIR] [--budget N] "
    "[--heldout.split validation] [--heldout.problems N] [--shared.KEY value] [--only METHOD,METHOD]"
)
SHARED_PREFIX = "--shared."  # ``--shared.seed 1``: a qalign.train key in ``shared``, over the YAML's
# `heldout:` and `offline:` are dataclass-typed fields: `heldout: {split: x}` ≡ `--heldout.split x`.
SPEC = ConfigSpec(name="compare", classes=(CompareConfig,), sections=("heldout", "offline"), usage=USAGE)


def parse_compare_args(argv: Sequence[str], values: Mapping[str, Any] | None = None) -> CompareConfig:
    """``--config COMPARE.yaml [--key value …]`` (``values`` from code under the command line) → a checked
    comparison; nothing heavy is imported, and every method's keys are validated."""
    argv, shared_overrides = split_shared_overrides(argv)
    (config,) = load_config(argv, SPEC, values)
    if not config.methods:
        raise ConfigError(f"'methods' must map method names to their overrides ({', '.join(METHODS)})")
    config.shared = {**flatten_sections(config.shared, TRAIN_SECTIONS), **shared_overrides}
    config.methods = {name: dict(section or {}) for name, section in config.methods.items()}
    config.only = _method_list(config.only)
    # The report names the YAML and the command-line keys that change what every method trains.
    config.source = " ".join(
        [str(split_argv(argv)[0] or ""), *(f"--shared.{k} {v}" for k, v in shared_overrides.items())]
    )
    check(config)
    return config


def split_shared_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Take ``--shared.KEY value`` out of ``argv``: ``(the rest, {KEY: value})``.

    ``shared`` is a mapping of qalign.train keys rather than a dataclass, so the generic loader cannot type
    its members: each value is read as a YAML scalar (``1`` → 1), a section's dots become underscores as in
    the YAML's flattening (``--shared.rollout.backend hf`` ≡ ``rollout_backend``), and ``check`` validates
    them with every method's keys, as if written in the YAML's ``shared``. A second training seed of the
    same recipes is ``--shared.seed 1 --output_dir outputs/compare_demo_seed1``."""
    rest: list[str] = []
    shared: list[str] = []
    taking = False
    for token in argv:
        if token.startswith("--"):
            if token.partition("=")[0] == "--shared":  # would replace the YAML's whole `shared` mapping
                raise ConfigError("set one shared key at a time with --shared.KEY value (e.g. --shared.seed 1)")
            taking = token.startswith(SHARED_PREFIX)
            if taking:
                token = "--" + token[len(SHARED_PREFIX) :]
                if token == "--" or token.startswith("--="):
                    raise ConfigError(f"{SHARED_PREFIX}KEY needs a qalign.train key, e.g. --shared.seed 1")
        (shared if taking else rest).append(token)
    overrides = split_argv(shared)[1]
    return rest, {key: [yaml_scalar(v) for v in value] if isinstance(value, list) else yaml_scalar(value)
                  for key, value in overrides.items()}  # fmt: skip


def load_compare_config(path: str, overrides: Mapping[str, Any] | None = None) -> CompareConfig:
    """A comparison YAML, with flat ``overrides`` (``heldout_split``, ``budget``…) over it."""
    return parse_compare_args(["--config", str(path)], overrides)


def _method_list(items: list[str]) -> list[str]:
    """``["grpo,shiq"]`` (``--only grpo,shiq``) or ``["grpo", "shiq"]`` → ``["grpo", "shiq"]``."""
    return [name.strip() for item in items for name in str(item).split(",") if name.strip()]


def check(config: CompareConfig) -> None:
    """Every value the comparison relies on, checked before any model loads."""
    if config.budget < 1:
        raise ConfigError(f"budget must be >= 1 completion, got {config.budget}")
    from qalign.tracking import check_report_to

    try:
        check_report_to(config.report_to)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not 0 < config.confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {config.confidence}")
    held = config.heldout
    if held.problems < 1 or held.n < 1 or held.kl_problems < 0 or held.batch_size < 1:
        raise ConfigError("heldout.problems, heldout.n and heldout.batch_size must be >= 1 (kl_problems >= 0)")
    if held.temperature <= 0:
        raise ConfigError(f"heldout.temperature must be > 0 (sampled accuracy), got {held.temperature}")
    from qalign.rollout.config import CHOICES

    if held.rollout_backend not in CHOICES:
        raise ConfigError(f"heldout.rollout_backend {held.rollout_backend!r} is not one of {CHOICES}")
    unknown = [name for name in config.only if name not in config.methods]
    if unknown:
        raise ConfigError(f"only: {', '.join(unknown)} not among the config's methods ({', '.join(config.methods)})")
    if config.offline.num_samples < 1:
        raise ConfigError(f"offline.num_samples must be >= 1, got {config.offline.num_samples}")
    if held.split not in ("test", "validation"):
        raise ConfigError(
            f"heldout.split must be 'test' or 'validation' (carved from the training split), got {held.split!r}"
        )
    if config.curve_points < 0:
        raise ConfigError(f"curve_points must be >= 0, got {config.curve_points}")
    for name in config.methods:
        plan_method(config, name)  # raises on a bad method, key or budget


def method_of(config: CompareConfig, name: str) -> str:
    section = config.methods[name]
    method = str(section.get("method", name))
    if method not in METHODS:
        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        where = f"method {method!r} of section {name!r}" if "method" in section else f"method {name!r}"
        raise ConfigError(f"unknown {where}; valid: {', '.join(METHODS)} (or set `method:` in the section).{hint}")
    return method


def _divide(total: int, per_unit: int, what: str, name: str) -> int:
    if per_unit < 1 or total % per_unit:
        raise ConfigError(f"budget {total} does not divide into whole {what} of {per_unit} completions for "
                          f"{name!r}; choose a budget that is a multiple of {per_unit}")  # fmt: skip
    return total // per_unit


def offline_data_dir(config: CompareConfig) -> Path:
    return config.root / "offline_data"


def offline_prompts(config: CompareConfig) -> int:
    return _divide(config.budget, config.offline.num_samples, "prompts", "offline")


def plan_method(config: CompareConfig, name: str) -> MethodPlan:
    """What ``name`` trains with, sized so that it samples exactly ``config.budget`` completions."""
    method = method_of(config, name)
    if method == "qprobe":
        return _plan_qprobe(config, name)
    section = {k: v for k, v in flatten_sections(config.methods[name], TRAIN_SECTIONS).items() if k != "method"}
    planned = [k for k in section if k in PLANNED_KEYS]
    if planned:
        raise ConfigError(f"method {name!r} sets {planned[0]!r}, which the comparison sets itself "
                          f"(the budget sizes each run); remove it from the section")  # fmt: skip
    if method == "reference":
        if section:
            raise ConfigError(f"'reference' trains nothing and takes no keys, got {sorted(section)}")
        return MethodPlan(name, method, None, 0, "π_ref untouched")
    merged = {**config.shared, **section}
    train: dict[str, Any] = {**merged, "algorithm": TRAINED_BY[method], "eval_samples": 0,
                             "output_dir": str(config.root / name / "model")}  # fmt: skip
    get = lambda key: int(merged.get(key, DEFAULTS[key]))
    if method in ONLINE:
        per_step = get("per_device_train_batch_size") * get("gradient_accumulation_steps")
        train["max_steps"] = _divide(config.budget, per_step, "training steps", name)
        train["logging_steps"] = 1  # every step's completion lengths, for the token count
        if config.curve_points:
            train["save_steps"] = max(1, train["max_steps"] // (config.curve_points + 1))
            train["save_total_limit"] = None
        note = f"{train['max_steps']} steps x {per_step} completions, on-policy"
    elif method in OFFLINE:
        train["rollouts_path"] = str(offline_data_dir(config))
        note = (f"{offline_prompts(config)} prompts x {config.offline.num_samples} samples of π_ref "
                f"(T = {config.offline.temperature}), shared by the offline methods")  # fmt: skip
    else:
        iterations, per_prompt = get("num_iterations"), get("num_samples_per_prompt")
        train["max_train_samples"] = _divide(config.budget, iterations * per_prompt, "prompt groups", name)
        train["guidance"] = "cd" if method == "cd" else "qsharp"
        note = f"{iterations} iterations x {train['max_train_samples']} prompts x {per_prompt} samples"
    if method in ONLINE or method in OFFLINE:
        # A killed training resumes from its newest checkpoint instead of starting over: one every quarter
        # of the run (transformers reads a save_steps below 1 as that share of the total steps).
        train.setdefault("save_steps", 0.25)
        train.setdefault("save_total_limit", 1)
    _keep_validation_out(config, name, method, train)
    _validate_train_keys(name, train)
    return MethodPlan(name, method, train, config.budget, note)


def training_problems(config: CompareConfig) -> int:
    """How many problems of the training split the methods may train on: all of them, or (with a
    validation split carved from it) all but its last ``heldout.problems``."""
    total = train_split_size(config)
    if config.heldout.split == "test":
        return total
    if config.heldout.problems >= total:
        raise ConfigError(f"heldout.problems {config.heldout.problems} leaves nothing to train on: the training "
                          f"split has {total} problems")  # fmt: skip
    return total - config.heldout.problems


_SPLIT_SIZES: dict[tuple, int] = {}


def train_split_size(config: CompareConfig) -> int:
    shared = config.shared
    key = (shared.get("dataset_name", "arithmetic"), shared.get("dataset_train_split", "train"),
           shared.get("dataset_config"))  # fmt: skip
    if key not in _SPLIT_SIZES:
        from qalign.data.sources import load_raw

        _SPLIT_SIZES[key] = len(load_raw(key[0], key[1], key[2]))
    return _SPLIT_SIZES[key]


def _keep_validation_out(config: CompareConfig, name: str, method: str, train: dict[str, Any]) -> None:
    """With a validation split carved from train, no method may see its problems: online methods train on
    the first problems only; offline data and Q#'s prompts (the first N) must fit before it."""
    if config.heldout.split != "validation":
        return
    allowed = training_problems(config)
    if method in ONLINE:
        train["max_train_samples"] = min(allowed, int(train.get("max_train_samples") or allowed))
        return
    _refuse_reaching_validation(name, offline_prompts(config) if method in OFFLINE else int(train["max_train_samples"]),
                                allowed)  # fmt: skip


def _refuse_reaching_validation(name: str, used: int, allowed: int) -> None:
    """A method that trains on the first ``used`` training prompts must stop before the validation problems."""
    if used > allowed:
        raise ConfigError(f"method {name!r} would train on {used} prompts, but only the first {allowed} of the "
                          f"training split lie before the validation problems; lower the budget")  # fmt: skip


def _plan_qprobe(config: CompareConfig, name: str) -> MethodPlan:
    """A ``qalign.probe`` run: probes trained on π_ref's samples of the first training prompts, evaluated as
    best-of-k on the held-out problems every method is graded on (the first ``heldout.problems`` of the test split,
    of ``heldout.data_file``, or of the validation problems carved from train)."""
    from qalign.probe.config import ProbeArguments

    section = {k: v for k, v in flatten_sections(config.methods[name], PROBE_SECTIONS).items() if k != "method"}
    loss = str(section.pop("loss", "pg"))
    beta = float(section.pop("beta", 0.0))
    for key in section:
        if key in PROBE_PLANNED:
            raise ConfigError(f"method {name!r} sets {key!r}, which the comparison sets itself; remove it")
    valid = {f.name for f in fields(ProbeArguments)}
    check_keys("probe", section, valid, {key: f"in method {name!r}" for key in section})
    shared, held_file = config.shared, config.heldout.data_file
    k = int(section.get("samples_per_prompt", 8))
    probe: dict[str, Any] = {
        **{key: shared[key] for key in ("model_name_or_path", "dtype", "dataset_name", "dataset_config",
                                        "prompt_template", "system_prompt", "chat_template_kwargs", "seed")
           if key in shared},
        "train_split": shared.get("dataset_train_split", "train"),
        "fallback_last_number": "accuracy_last_number" in (shared.get("reward_funcs") or []),
        "temperature": config.heldout.temperature, "top_p": config.heldout.top_p, "max_tokens": config.max_tokens,
        **section,
        "samples_per_prompt": k, "losses": [loss], "betas": [beta], "k_values": sorted({1, k}),
        "num_train_prompts": _divide(config.budget, k, "prompts", name),
        "num_test_prompts": config.heldout.problems, "test_split": "test",
        "output_dir": str(config.root / name / "model"),
    }  # fmt: skip
    # The file the other methods are graded on (the runner writes validation.jsonl before the probe runs); the key
    # is left out without one, so a comparison planned before it existed still resumes.
    test_file = str(config.root / "validation.jsonl") if config.heldout.split == "validation" else held_file
    if test_file:
        probe["test_data_file"] = test_file
    if config.heldout.split == "validation":
        _refuse_reaching_validation(name, probe["num_train_prompts"], training_problems(config))
    note = (f"probe ({loss}, β {beta}) on {probe['num_train_prompts']} prompts x {k} samples; best-of-{k} at test "
            f"time: {k} samples per held-out problem")  # fmt: skip
    return MethodPlan(name, "qprobe", probe, config.budget, note, entry="qalign.probe")


def _validate_train_keys(name: str, train: dict[str, Any]) -> None:
    """``qalign.train``'s checks that need no torch (unknown keys, ranges, paths), for one method's merged
    config, so that a bad method fails before the first one runs."""
    validate_keys(train["algorithm"], list(train), {key: f"in method {name!r} or shared" for key in train})
    try:
        validate_values(train["algorithm"], flatten_sections(train, TRAIN_SECTIONS))
    except ConfigError as error:
        raise ConfigError(f"method {name!r}: {error}") from None


def collect_config(config: CompareConfig) -> dict[str, Any]:
    """The ``qalign.collect`` config of the shared offline data (π_ref's own samples)."""
    shared = config.shared
    keys = ("model_name_or_path", "dtype", "dataset_name", "dataset_config", "question_column", "answer_column",
            "prompt_template", "system_prompt", "chat_template_kwargs", "reward_funcs", "seed")  # fmt: skip
    return {
        **{k: shared[k] for k in keys if k in shared},
        "dataset_split": shared.get("dataset_train_split", "train"),
        "max_prompts": offline_prompts(config),
        "num_samples": config.offline.num_samples,
        "temperature": config.offline.temperature,
        "top_p": config.offline.top_p,
        "max_tokens": int(shared.get("max_completion_length", 256)),
        "output_dir": str(offline_data_dir(config)),
        # The rollout settings the methods train with apply to the offline collection too (a backend left unset
        # there takes the collection's own default, auto).
        **{k: v for k, v in shared.items() if k.startswith("rollout_")},
    }
