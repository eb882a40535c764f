"""``python -m qalign.probe`` config: ``ProbeArguments``, loaded by the one config loader
(``qalign.config.load_config``).

The ``sampler:``, ``embedder:`` and ``probe:`` sections flatten to ``sampler_*``, ``embedder_*`` and
``probe_*`` keys (``--embedder.kind`` ≡ ``--embedder_kind``); unknown keys fail with the closest valid
names; every check runs before torch or a model is imported.

API keys are never config values: ``*_api_key_env`` names the environment variable that holds one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qalign.config import ConfigError, ConfigSpec, load_config

__all__ = ["ConfigError", "ProbeArguments", "parse_probe_args"]

SECTIONS = ("sampler", "embedder", "probe")
SAMPLER_BACKENDS = ("hf", "vllm", "vllm_server", "openai_completions", "openai_chat")
EMBEDDER_KINDS = ("hidden_state", "sentence_transformers", "openai")
LOSSES = ("mse", "ce", "pg", "bt")  # qalign.losses.qprobe.QPROBE_LOSSES, without importing torch


@dataclass
class ProbeArguments:
    """Collect samples → embed → train probes → evaluate best-of-k, for one base model and task."""

    # --- base model and task
    model_name_or_path: str = field(
        default="smollm2-135m-instruct",
        metadata={
            "help": "Base model p0 (sampler for hf/vllm backends, tokenizer/chat template, hidden-state "
            "embedder): hub id, local folder, or the embedded default 'smollm2-135m-instruct'."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype of local models."})
    dataset_name: str = field(default="arithmetic", metadata={"help": "Dataset (qalign.data.load_math_split)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    train_split: str = field(default="train", metadata={"help": "Split the probes are trained on."})
    test_split: str = field(default="test", metadata={"help": "Held-out split the k-table is computed on."})
    num_train_prompts: int = field(default=32, metadata={"help": "Training prompts (first N of the split)."})
    num_test_prompts: int = field(default=32, metadata={"help": "Held-out prompts (first N of the split)."})
    test_data_file: str | None = field(
        default=None,
        metadata={"help": "Held-out problems from this local .jsonl/.json/.parquet/.csv file (question and answer "
                          "columns) instead of test_split of dataset_name, e.g. a validation split carved from train."},
    )  # fmt: skip
    prompt_template: str = field(default="boxed_short", metadata={"help": "Template of qalign.data.prompts."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword arguments for the chat template (e.g. {enable_thinking: false})."}
    )
    fallback_last_number: bool = field(
        default=True, metadata={"help": "Grade the last number of a completion with no explicit answer."}
    )

    # --- sampler: a_1..a_n ~ p0(·|x)
    sampler_backend: str = field(
        default="hf",
        metadata={
            "help": f"One of {SAMPLER_BACKENDS}: a qalign rollout engine, or an OpenAI-compatible API "
            "(/v1/completions with the rendered prompt, or /v1/chat/completions with the user message)."
        },
    )
    sampler_base_url: str | None = field(
        default=None, metadata={"help": "API root for openai_* backends, e.g. http://127.0.0.1:8000/v1."}
    )
    sampler_model: str | None = field(default=None, metadata={"help": "Model name the API knows (openai_*)."})
    sampler_api_key_env: str | None = field(
        default=None, metadata={"help": "Name of the environment variable holding the sampler API key (null: none)."}
    )
    sampler_batch_size: int = field(default=16, metadata={"help": "Prompts per HF generate batch."})
    sampler_max_concurrency: int = field(default=4, metadata={"help": "API requests in flight at once."})
    sampler_max_retries: int = field(default=6, metadata={"help": "Re-sends of a failed API request."})
    sampler_timeout: float = field(default=300.0, metadata={"help": "Seconds one API request may take."})
    samples_per_prompt: int = field(default=8, metadata={"help": "n samples cached per prompt (max k)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of p0."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    max_tokens: int = field(default=32, metadata={"help": "Completion token budget."})
    seed: int = field(default=0, metadata={"help": "Sampling, training and evaluation seed."})

    # --- embedder: φ(x, a)
    embedder_kind: str = field(default="hidden_state", metadata={"help": f"One of {EMBEDDER_KINDS}."})
    embedder_model: str | None = field(
        default=None,
        metadata={
            "help": "hidden_state: a causal LM (default: model_name_or_path); sentence_transformers: a "
            "folder or 'minilm' (default); openai: the model name the server knows (with "
            "embedder_start_server: the model to serve, default 'minilm')."
        },
    )
    embedder_layer: int = field(default=-1, metadata={"help": "hidden_state: hidden_states index (-1 = last)."})
    embedder_position: str = field(
        default="last", metadata={"help": "hidden_state: 'last' token of prompt+completion or 'mean_completion'."}
    )
    embedder_batch_size: int = field(default=32, metadata={"help": "Texts per forward pass / API request."})
    embedder_text_format: str = field(
        default="{prompt}\n{completion}", metadata={"help": "Text embedders: how prompt and completion are joined."}
    )
    embedder_base_url: str | None = field(default=None, metadata={"help": "openai: API root, e.g. .../v1."})
    embedder_api_key_env: str | None = field(
        default=None, metadata={"help": "openai: name of the environment variable holding the API key (null: none)."}
    )
    embedder_max_concurrency: int = field(default=4, metadata={"help": "openai: requests in flight at once."})
    embedder_max_retries: int = field(default=6, metadata={"help": "openai: re-sends of a failed request."})
    embedder_timeout: float = field(default=60.0, metadata={"help": "openai: seconds one request may take."})
    embedder_dimensions: int | None = field(
        default=None, metadata={"help": "openai: output size, if the model supports it."}
    )
    embedder_cache_path: str | None = field(
        default=None,
        metadata={"help": "openai: sqlite cache of (model, text) → vector (default: output_dir/embeddings.sqlite)."},
    )
    embedder_start_server: bool = field(
        default=False, metadata={"help": "openai: serve embedder_model with vLLM on 127.0.0.1 for this run."}
    )

    # --- probes
    losses: list[str] = field(
        default_factory=lambda: ["mse", "ce", "pg", "bt"],
        metadata={"help": f"Train one probe per loss: any of {LOSSES}."},
    )
    probe_depth: int = field(default=1, metadata={"help": "1 = linear (wᵀφ + b); 2, 3 = MLP."})
    probe_hidden: int = field(default=256, metadata={"help": "MLP hidden width."})
    probe_epochs: int = field(default=150, metadata={"help": "Training epochs."})
    probe_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    probe_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    probe_batch_prompts: int = field(default=100, metadata={"help": "Prompts per optimiser step."})
    probe_chunk_size: int | None = field(
        default=None,
        metadata={"help": "PG: samples per softmax chunk, in [2, samples_per_prompt] (default: samples_per_prompt)."},
    )
    probe_beta: float = field(default=1.0, metadata={"help": "PG: training temperature β."})
    probe_standardize: bool = field(default=True, metadata={"help": "Standardise features with training statistics."})

    # --- evaluation and output
    k_values: list[int] | None = field(
        default=None,
        metadata={"help": "k of π_{θ,k} in the table (each <= samples_per_prompt); default 1, 2, 4, …, n."},
    )
    betas: list[float] = field(
        default_factory=lambda: [0.0], metadata={"help": "Selection temperatures β (0 = argmax)."}
    )
    eval_shuffles: int = field(default=20, metadata={"help": "Random re-chunkings averaged per k."})
    output_dir: str = field(default="outputs/probe", metadata={"help": "Samples, features, probes, results, plot."})
    overwrite: bool = field(
        default=False, metadata={"help": "Delete cached samples/features in output_dir instead of reusing them."}
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={"help": "Trackers that get the k-tables: none, tensorboard (<output_dir>/runs), trackio, wandb."},
    )

    def __post_init__(self) -> None:
        self.validate()

    @property
    def ks(self) -> list[int]:
        if self.k_values:
            return sorted(set(self.k_values))
        ks, k = [], 1
        while k <= self.samples_per_prompt:
            ks.append(k)
            k *= 2
        return ks

    def validate(self) -> None:
        from qalign.data.prompts import TEMPLATES

        if self.sampler_backend not in SAMPLER_BACKENDS:
            raise ConfigError(f"sampler.backend {self.sampler_backend!r} is not one of {SAMPLER_BACKENDS}")
        if self.sampler_backend.startswith("openai") and not (self.sampler_base_url and self.sampler_model):
            raise ConfigError(f"sampler.backend {self.sampler_backend} needs sampler.base_url and sampler.model")
        if self.embedder_kind not in EMBEDDER_KINDS:
            raise ConfigError(f"embedder.kind {self.embedder_kind!r} is not one of {EMBEDDER_KINDS}")
        serves_itself = self.embedder_start_server
        if (
            self.embedder_kind == "openai"
            and not serves_itself
            and not (self.embedder_base_url and self.embedder_model)
        ):
            raise ConfigError("embedder.kind openai needs embedder.base_url and embedder.model "
                              "(or embedder.start_server: true to serve one locally)")  # fmt: skip
        if self.embedder_position not in ("last", "mean_completion"):
            raise ConfigError(f"embedder.position must be 'last' or 'mean_completion', got {self.embedder_position!r}")
        if self.test_data_file is not None:
            from pathlib import Path

            from qalign.data.sources import LOCAL_SUFFIXES

            if not Path(self.test_data_file).expanduser().is_file() or not self.test_data_file.endswith(LOCAL_SUFFIXES):
                raise ConfigError(f"test_data_file {self.test_data_file!r} is not a {'/'.join(LOCAL_SUFFIXES)} file")
        if self.prompt_template not in TEMPLATES:
            raise ConfigError(f"prompt_template {self.prompt_template!r} is not one of {sorted(TEMPLATES)}")
        bad = [name for name in self.losses if name not in LOSSES]
        if bad or not self.losses:
            raise ConfigError(f"losses {self.losses}: each must be one of {LOSSES}")
        for key in ("num_train_prompts", "num_test_prompts", "samples_per_prompt", "max_tokens", "probe_depth",
                    "probe_epochs", "probe_batch_prompts", "eval_shuffles", "sampler_batch_size",
                    "embedder_batch_size", "sampler_max_concurrency", "embedder_max_concurrency"):  # fmt: skip
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        chunk = self.samples_per_prompt if self.probe_chunk_size is None else self.probe_chunk_size
        if "pg" in self.losses and not 2 <= chunk <= self.samples_per_prompt:
            raise ConfigError(f"probe.chunk_size must be in [2, samples_per_prompt={self.samples_per_prompt}] "
                              f"for the pg loss, got {chunk}")  # fmt: skip
        bad_k = [k for k in (self.k_values or []) if not 1 <= k <= self.samples_per_prompt]
        if bad_k:
            raise ConfigError(f"k_values {self.k_values}: every k must be in [1, samples_per_prompt="
                              f"{self.samples_per_prompt}]")  # fmt: skip
        if any(beta < 0 for beta in self.betas) or not self.betas:
            raise ConfigError(f"betas {self.betas}: need at least one, each >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.temperature == 0 and self.samples_per_prompt > 1:
            raise ConfigError("temperature 0 gives identical samples: best-of-k needs temperature > 0")
        if self.probe_beta <= 0:
            raise ConfigError(f"probe.beta must be > 0, got {self.probe_beta}")
        if not self.probe_lr > 0 or not self.probe_weight_decay >= 0:
            raise ConfigError(f"probe.lr must be > 0 and probe.weight_decay >= 0, got {self.probe_lr}, "
                              f"{self.probe_weight_decay}")  # fmt: skip
        from qalign.tracking import check_report_to

        try:
            check_report_to(self.report_to)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        from qalign.preflight import check_dataset_file, check_model_path

        check_model_path("model_name_or_path", self.model_name_or_path)
        check_dataset_file(self.dataset_name, None, None)


# ----------------------------------------------------------------------------- parsing


SPEC = ConfigSpec(
    name="probe", classes=(ProbeArguments,), sections=SECTIONS,
    usage="usage: python -m qalign.probe --config X.yaml [--key value ...]",
)  # fmt: skip


def parse_probe_args(argv: Sequence[str]) -> ProbeArguments:
    """Parse ``--config X.yaml --key value …`` into validated ``ProbeArguments`` (``--help`` prints the keys)."""
    (args,) = load_config(argv, SPEC)
    return args
