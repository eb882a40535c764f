"""``rollout:`` config section (flattened to ``rollout_*`` keys): which engine samples, and how.

Kept free of heavy imports (torch, vllm): config validation imports this module.

Example (YAML)::

    rollout:
      backend: vllm_server      # auto | hf | vllm | vllm_server
      num_servers: 2            # started by qalign on 127.0.0.1 (or give server_urls)
      sync_every: 1             # push weights to the engine every N optimizer steps
      async_steps: 1            # sample the next step's batch while this one trains (0 = lock-step)
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("hf", "vllm", "vllm_server")  # the engines; code past config loading only ever sees these
CHOICES = ("auto", *BACKENDS)  # what a config may say: auto is resolved once (qalign.rollout.backend)
ONLINE_ALGORITHMS = ("grpo", "qae", "shiq_online")  # the trainers that sample while they train (GRPOTrainer's path)


def check_async_steps(steps: object, backend: str) -> None:
    """``rollout.async_steps`` is a count, and above 0 needs an engine apart from the model being trained
    (``auto`` passes: it is checked again once resolved)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"rollout.async_steps must be an integer >= 0 (0 = lock-step), got {steps!r}")
    if steps and backend == "hf":
        raise ValueError(f"rollout.async_steps {steps} needs rollout.backend vllm or vllm_server: hf samples with "
                         "the model being trained, which cannot sample while it trains (or use async_steps 0)")  # fmt: skip


@dataclass
class RolloutArguments:
    rollout_backend: str = field(
        default="hf",
        metadata={
            "help": f"Rollout engine: one of {CHOICES} (hf = transformers generate, vllm = in-process vLLM, "
            "vllm_server = OpenAI-compatible vLLM server workers, auto = vllm where it is installed and can "
            "sample the policy, else hf). Online training defaults to hf; eval, collect and Q# to auto."
        },
    )
    rollout_sync_every: int = field(
        default=1,
        metadata={"help": "Push the trained weights (or LoRA adapter) to vLLM every N optimizer steps."},
    )
    rollout_dtype: str = field(
        default="auto",
        metadata={"help": "vLLM dtype; 'auto' = the dtype of the model being trained."},
    )
    rollout_max_model_len: int | None = field(
        default=None,
        metadata={"help": "vLLM context length (prompt + completion); default: the model's own limit."},
    )
    rollout_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={"help": "Fraction of GPU memory vLLM may take (in-process: it shares the GPU with training)."},
    )
    rollout_enforce_eager: bool | None = field(
        default=None,
        metadata={
            "help": "Disable CUDA graphs in vLLM. Unset: eager on CPU (required there), CUDA graphs on GPUs "
            "(2.1x faster GRPO steps on an H100 for ~45 s more start-up, see docs/gpu_results.md)."
        },
    )
    rollout_max_lora_rank: int = field(
        default=64,
        metadata={"help": "Largest LoRA rank vLLM must accept (used when the trained model is a PEFT LoRA model)."},
    )
    rollout_seed: int | None = field(
        default=None,
        metadata={"help": "vLLM engine seed; default: the training seed."},
    )
    rollout_server_urls: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Already running vLLM servers (e.g. http://127.0.0.1:8000). Empty: qalign starts "
            "rollout_num_servers servers itself. Weight sync needs them started with VLLM_SERVER_DEV_MODE=1 "
            "(and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True plus --enable-lora for LoRA)."
        },
    )
    rollout_num_servers: int = field(
        default=1, metadata={"help": "How many vLLM server workers qalign starts when no URL is given."}
    )
    rollout_server_host: str = field(
        default="127.0.0.1", metadata={"help": "Host the servers started by qalign bind to."}
    )
    rollout_server_port: int = field(
        default=0,
        metadata={"help": "First port for servers started by qalign (0 = pick free ports)."},
    )
    rollout_server_start_timeout: float = field(
        default=900.0, metadata={"help": "Seconds to wait for a started server to answer /health."}
    )
    rollout_request_timeout: float = field(
        default=900.0, metadata={"help": "Seconds one generation request to a server may take."}
    )
    rollout_sync_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder the weights/adapter are written to for server workers to load (default: a local "
            "temporary folder). Servers on other nodes need a path they can read too: a shared filesystem."
        },
    )
    rollout_max_retries: int = field(
        default=3,
        metadata={"help": "How many times a failed server request is re-sent (to another worker when one is left)."},
    )
    rollout_async_steps: int = field(
        default=0,
        metadata={
            "help": "Asynchronous rollouts for online training (grpo, qae, shiq_online): the generation batches of "
            "the next K optimizer steps are sampled while the current step trains (vllm: on a background thread; "
            "vllm_server: on the server workers). A batch is trained on at most K policy versions (weight pushes) "
            "after the weights that sampled it; TRL's importance-sampling correction divides by the sampler's own "
            "log-probs, and rollout/staleness/{mean,max} logs the lag per step. 0: lock-step, sample then train. "
            "Needs rollout.backend vllm or vllm_server."
        },
    )

    def __post_init__(self) -> None:
        if self.rollout_backend not in CHOICES:
            raise ValueError(f"rollout.backend {self.rollout_backend!r} is not one of {CHOICES}")
        if self.rollout_sync_every < 1:
            raise ValueError(f"rollout.sync_every must be >= 1, got {self.rollout_sync_every}")
        if self.rollout_num_servers < 1:
            raise ValueError(f"rollout.num_servers must be >= 1, got {self.rollout_num_servers}")
        if not 0 < self.rollout_gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.gpu_memory_utilization must be in (0, 1], got {self.rollout_gpu_memory_utilization}"
            )
        if self.rollout_max_retries < 0:
            raise ValueError(f"rollout.max_retries must be >= 0, got {self.rollout_max_retries}")
        check_async_steps(self.rollout_async_steps, self.rollout_backend)


@dataclass
class SamplingRolloutArguments(RolloutArguments):
    """The ``rollout:`` section of commands that sample a fixed policy (qalign eval, qalign collect, Q#'s
    collection): the engine defaults to ``auto``, resolved by ``qalign.rollout.backend.resolve_backend``.
    Online training keeps ``hf``: its engine takes weight syncs every step and shares the trainer's memory."""

    rollout_backend: str = field(
        default="auto",
        metadata={
            "help": f"Rollout engine: one of {CHOICES}. auto (the default here) = in-process vllm where vLLM is "
            "installed and can sample the policy (measured 1.8-1.95x HF generate on the embedded default on a "
            "2-core CPU, docs/rollout_backends.md), else hf; the choice is logged and recorded with the results."
        },
    )

    def __post_init__(self) -> None:
        if self.rollout_async_steps != 0:
            # Accepted, it would do nothing: the engine samples a fixed policy and nothing trains meanwhile.
            raise ValueError(f"rollout.async_steps applies to online training ({', '.join(ONLINE_ALGORITHMS)}); "
                             f"this command samples a fixed policy: leave it 0, got {self.rollout_async_steps!r}")  # fmt: skip
        super().__post_init__()
