"""Eval config: ``EvalArguments``, loaded by the one config loader (``qalign.config.load_config``).

Safe YAML, a ``rollout:`` section flattens to ``rollout_*`` keys, ``--a.b`` ≡ ``--a_b``, a bare ``--flag``
means true and several values make a list; ``--data_files gsm8k=path`` fills the ``data_files`` mapping.
Unknown keys fail with the closest valid names, and every check (benchmark names, local files, k ≤ n, …)
runs here, before torch or any model is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qalign.config import ConfigError, ConfigSpec, load_config
from qalign.eval.benchmarks import BENCHMARKS
from qalign.rollout.config import RolloutArguments, SamplingRolloutArguments

__all__ = ["ConfigError", "EvalArguments", "parse_eval_args"]

SECTIONS = ("rollout",)


@dataclass
class EvalArguments(SamplingRolloutArguments):
    """What to evaluate, on which benchmarks, how to sample, and where results go.

    Inherits the ``rollout_*`` keys of training (``rollout: {backend: vllm, ...}``), so the same
    engine factory (``qalign.rollout.build_engine``) builds the sampler here. ``rollout.backend``
    defaults to ``auto``, resolved once here (``resolve_rollout_backend``): the summary's
    ``policy.backend`` records the engine that sampled.
    """

    # --- policy
    policy: str | None = field(
        default=None,
        metadata={
            "help": "A saved policy to evaluate: a model or LoRA adapter folder, a Q# output folder "
            "(guided_policy.json) or a Q-probe output folder (best_of_k_policy.json). Takes the place "
            "of model_name_or_path."
        },
    )
    model_name_or_path: str = field(
        default="smollm2-135m-instruct",
        metadata={
            "help": "Model to evaluate: hub id, local folder (full checkpoint or LoRA adapter folder), "
            "or the embedded default 'smollm2-135m-instruct'."
        },
    )
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base model for a LoRA adapter folder (default: the adapter's own base_model_name_or_path)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate batch (HF engine)."})

    # --- data
    benchmarks: list[str] = field(
        default_factory=lambda: ["gsm8k"], metadata={"help": f"Benchmarks to run: any of {list(BENCHMARKS)}."}
    )
    data_files: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Local copies, benchmark → file or folder in the benchmark's schema "
            "(YAML mapping, or --data_files gsm8k=path). Unlisted benchmarks load from the hub."
        },
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems of each benchmark."})
    prompt_template: str = field(
        default="boxed", metadata={"help": "Prompt template of qalign.data.prompts (boxed, boxed_short, plain)."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword arguments for the chat template (e.g. {enable_thinking: false})."}
    )

    # --- sampling
    n: int = field(default=1, metadata={"help": "Samples per problem."})
    k_values: list[int] | None = field(
        default=None, metadata={"help": "k of pass@k / maj@k (each <= n); default 1, 2, 4, …, n."}
    )
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature (0 = greedy, needs n = 1)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 disables)."})
    max_tokens: int = field(default=1024, metadata={"help": "Completion token budget."})
    stop: list[str] | None = field(default=None, metadata={"help": "Stop strings."})
    seed: int = field(
        default=0,
        metadata={
            "help": "Base seed; each chunk of problems is sampled with a seed derived from "
            "(seed, benchmark, first problem index), so results do not depend on run order."
        },
    )
    problems_per_call: int = field(
        default=1,
        metadata={
            "help": "Problems per generate call (their n samples each). Part of the sampling "
            "recipe: changing it changes the samples. Larger is faster on vLLM."
        },
    )

    # --- grading and output
    fallback_last_number: bool = field(
        default=False, metadata={"help": "Grade the last number of a completion that has no explicit answer."}
    )
    output_dir: str = field(default="outputs/eval", metadata={"help": "Run folder: samples, summary, plot."})
    overwrite: bool = field(
        default=False, metadata={"help": "Delete existing samples in output_dir instead of resuming from them."}
    )
    show_progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Trackers that get the summary numbers: none, tensorboard (<output_dir>/runs), trackio, wandb."
        },
    )

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.validate()
        self.resolve_rollout_backend()

    def rollout_arguments(self) -> RolloutArguments:
        """The ``rollout_*`` fields as the ``RolloutArguments`` the engine factory takes."""
        return RolloutArguments(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RolloutArguments)})

    def resolve_rollout_backend(self) -> None:
        """``rollout.backend: auto`` → an engine (``qalign.rollout.backend``'s rule): hf for a best-of-k
        policy, the engine of the samples being resumed, else vllm where it can run (a Q# guided policy
        included: its value model runs inside vLLM's sampler). vLLM then loads the weights in ``dtype``, as
        HF would, so the two agree up to sampling noise."""
        from qalign.rollout.backend import AUTO, recorded_backend, resolve_backend
        from qalign.sample_store import settings_path

        if self.rollout_backend != AUTO:
            return
        unsupported = {"qprobe_best_of_k": "a best-of-k policy keeps its own sampler"}.get(self.policy_kind)
        stores = [settings_path(Path(self.output_dir) / "samples" / f"{name}.jsonl") for name in self.benchmarks]
        recorded = None if self.overwrite else recorded_backend(stores, lambda meta: meta["policy"]["backend"])
        self.rollout_backend = resolve_backend(AUTO, unsupported=unsupported, recorded=recorded)
        if self.rollout_backend == "vllm" and self.rollout_dtype == "auto":
            self.rollout_dtype = self.dtype

    @property
    def policy_kind(self) -> str:
        """What ``policy`` (or ``model_name_or_path``) is: model, lora, qsharp, cd or qprobe_best_of_k."""
        from qalign.policies import policy_kind

        return policy_kind(self.policy if self.policy is not None else self.model_name_or_path)

    @property
    def ks(self) -> list[int]:
        """The k values reported (explicit list, or powers of two up to n)."""
        from qalign.eval.metrics import default_k_values

        return sorted(set(self.k_values)) if self.k_values else default_k_values(self.n)

    def validate(self) -> None:
        """Raise ConfigError for the first value that cannot work, naming the key."""
        from qalign.data.prompts import TEMPLATES

        if not self.benchmarks:
            raise ConfigError("benchmarks is empty: name at least one of " + ", ".join(BENCHMARKS))
        for name in self.benchmarks:
            if name not in BENCHMARKS:
                close = difflib.get_close_matches(name, BENCHMARKS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}.{hint}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ConfigError(f"benchmarks lists a name twice: {self.benchmarks}")
        for name, path in self.data_files.items():
            if name not in self.benchmarks:
                raise ConfigError(f"data_files names {name!r}, which is not in benchmarks {self.benchmarks}")
            if not Path(str(path)).expanduser().exists():
                raise ConfigError(f"data_files.{name}: {str(path)!r} does not exist")
        if self.prompt_template not in TEMPLATES:
            raise ConfigError(f"prompt_template {self.prompt_template!r} is not one of {sorted(TEMPLATES)}")
        from qalign.policies import PolicyError
        from qalign.preflight import check_model_path

        if self.policy is not None:
            try:
                kind = self.policy_kind
            except PolicyError as error:
                raise ConfigError(str(error)) from None
            if kind in ("model", "lora"):  # a plain model: the same path as model_name_or_path
                self.model_name_or_path = self.policy
            if kind in ("qsharp", "cd") and self.rollout_backend not in ("auto", "hf", "vllm"):
                raise ConfigError(f"rollout.backend {self.rollout_backend!r} cannot guide a {kind} policy "
                                  "(its value model runs inside the sampler): use hf, vllm or auto")  # fmt: skip
        check_model_path("model_name_or_path", self.model_name_or_path)
        if self.base_model_name_or_path is not None:
            check_model_path("base_model_name_or_path", self.base_model_name_or_path)
        for key in ("n", "batch_size", "max_tokens", "problems_per_call"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1 (or null for all problems), got {self.limit}")
        if self.k_values is not None:
            bad = [k for k in self.k_values if not 1 <= k <= self.n]
            if bad or not self.k_values:
                raise ConfigError(f"k_values {self.k_values}: every k must be in [1, n={self.n}]")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n > 1:
            raise ConfigError(f"n={self.n} greedy (temperature 0) samples are identical; set temperature > 0 or n: 1")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        from qalign.tracking import check_report_to

        try:
            check_report_to(self.report_to)
        except ValueError as error:
            raise ConfigError(str(error)) from None


# ----------------------------------------------------------------------------- parsing


SPEC = ConfigSpec(
    name="eval", classes=(EvalArguments,), sections=SECTIONS,
    usage="usage: python -m qalign.eval --config X.yaml [--key value ...]\n"
          "       python -m qalign.eval --compare RUN_A RUN_B",
)  # fmt: skip


def parse_eval_args(argv: Sequence[str]) -> EvalArguments:
    """Parse ``--config X.yaml --key value …`` into validated ``EvalArguments``.

    Raises ConfigError for unknown keys, values of the wrong type and values that fail
    validation; ``--help`` prints the keys and exits.
    """
    (args,) = load_config(argv, SPEC)
    return args
