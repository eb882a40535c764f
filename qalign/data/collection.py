"""Collect an offline rollout dataset: sample, grade, store with the reference model's statistics.

For each prompt of a dataset split: sample ``num_samples`` completions through the rollout engine,
grade them with the reward functions, and compute the reference model's per-token log-prob and
log-sum-exp once. Rows are appended to ``output_dir`` as parquet shards (format:
``qalign.data.rollouts``) as they are produced; a run started again with the same config skips every
prompt already written and samples the rest with the same per-shard seeds, so a resumed dataset
equals an uninterrupted one. Raising ``max_prompts`` later extends a dataset the same way.

``python -m qalign.collect`` is the command line over this module; the offline trainers call
``collect_from_yaml`` directly when their ``collect_config`` asks for the data, so neither imports the other.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qalign.config import ConfigSpec, load_config
from qalign.rollout.config import RolloutArguments, SamplingRolloutArguments

# Named after the command, as before the move, so log lines and log filters keep their name.
logger = logging.getLogger("qalign.collect")


# Settings added after collections existed: part of a collection's identity only when not at their default.
ADDED_LATER = ("chat_template_kwargs", "model_revision", "trust_remote_code", "attn_implementation")


@dataclass
class CollectArguments:
    """What to sample, from which policy, how to grade it, and where to write it."""

    model_name_or_path: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "Policy that samples (hub id, local folder or the embedded default)."},
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model π_ref for the per-token statistics (default: the sampling policy)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Model dtype."})
    # TRL's ModelConfig options, as qalign.train takes them (qalign.models.model_init_kwargs).
    model_revision: str = field(
        default="main", metadata={"help": "Hub revision (branch, tag or commit) of the models."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the hub."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation (eager, sdpa, flash_attention_2, …)."}
    )
    dataset_name: str = field(default="arithmetic", metadata={"help": "Prompt source, as qalign.train's dataset_name."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    dataset_split: str = field(default="train", metadata={"help": "Split to sample prompts from."})
    question_column: str | None = field(default=None, metadata={"help": "Problem column (detected when unset)."})
    answer_column: str | None = field(default=None, metadata={"help": "Gold-answer column (detected when unset)."})
    max_prompts: int | None = field(
        default=None, metadata={"help": "Use the first N prompts of the split (raise it later to extend)."}
    )
    prompt_template: str = field(default="boxed", metadata={"help": "Prompt template (qalign.data.TEMPLATES)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword arguments for the chat template (e.g. {enable_thinking: false})."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": "Reward functions (names or 'package.module:function'), summed into the sequence reward."},
    )
    num_samples: int = field(default=4, metadata={"help": "Completions per prompt."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (1: the data follows π_ref)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    max_tokens: int = field(default=256, metadata={"help": "Completion budget in tokens."})
    seed: int = field(
        default=0, metadata={"help": "Base seed; a shard's prompts sample with seed + its first prompt index."}
    )
    output_dir: str = field(
        default="outputs/rollouts", metadata={"help": "Rollout folder (created; resumed when it exists)."}
    )
    prompts_per_shard: int = field(default=16, metadata={"help": "Prompts per generation batch and per parquet shard."})
    ref_batch_size: int = field(default=16, metadata={"help": "Sequences per reference forward pass."})

    def __post_init__(self) -> None:
        from qalign import preflight as check

        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        check.check_fields(self, {
            "num_samples": check.POSITIVE_INT, "prompts_per_shard": check.POSITIVE_INT,
            "ref_batch_size": check.POSITIVE_INT, "max_tokens": check.POSITIVE_INT,
            "max_prompts": check.OPTIONAL_POSITIVE_INT, "temperature": check.NON_NEGATIVE,
            "top_p": check.RULES["top_p"], "top_k": check.COUNT,
        })  # fmt: skip
        check.check_model_path("model_name_or_path", self.model_name_or_path)
        if self.ref_model_name_or_path is not None:
            check.check_model_path("ref_model_name_or_path", self.ref_model_name_or_path)
        check.check_dataset_file(self.dataset_name, self.question_column, self.answer_column)
        check.check_reward_functions(self.reward_funcs)

    def content_key(self) -> dict[str, Any]:
        """The settings that define what a row is; a folder is only resumed under the same ones."""
        skip = {"output_dir", "prompts_per_shard", "ref_batch_size", "max_prompts"}
        # Keys added after datasets were collected count only when set, so those datasets still resume.
        later = {f.name: f.default for f in fields(self) if f.name in ADDED_LATER}
        return {k: v for k, v in asdict(self).items() if k not in skip and (k not in later or v != later[k])}


# ----------------------------------------------------------------------------- collection


def collect(args: CollectArguments, rollout_args: RolloutArguments | None = None) -> Path:
    """Sample, grade and write every prompt not yet in ``args.output_dir``; returns the folder."""
    from qalign.data import load_math_split, render_prompt
    from qalign.data.rollouts import RolloutWriter

    rollout_args = resolved_rollout(args, rollout_args or SamplingRolloutArguments())
    writer = RolloutWriter(args.output_dir, {**args.content_key(), "rollout_backend": rollout_args.rollout_backend})
    problems = load_math_split(args.dataset_name, args.dataset_split, args.dataset_config,
                               args.question_column, args.answer_column, args.max_prompts)  # fmt: skip
    done = writer.done_prompts()
    todo = [i for i in range(len(problems)) if i not in done]
    if not todo:
        logger.info("all %d prompts already in %s", len(problems), args.output_dir)
        return Path(args.output_dir)
    logger.info("collecting %d prompts x %d samples into %s (%d already there)",
                len(todo), args.num_samples, args.output_dir, len(done))  # fmt: skip

    from tqdm.auto import tqdm

    from qalign.models import load_model, load_tokenizer, model_init_kwargs, tokenizer_kwargs, whole_models
    from qalign.reward import get_reward_functions
    from qalign.rollout.factory import build_engine

    options = model_init_kwargs(args)
    tokenizer = load_tokenizer(args.model_name_or_path, **tokenizer_kwargs(args))
    with whole_models():  # collection may run on one process of a ZeRO-3 job
        model = load_model(args.model_name_or_path, args.dtype, **options)
        ref_path = args.ref_model_name_or_path
        ref_model = (
            model if ref_path in (None, args.model_name_or_path) else load_model(ref_path, args.dtype, **options)
        )
    extra = {"batch_size": args.prompts_per_shard} if rollout_args.rollout_backend == "hf" else {}
    engine = build_engine(rollout_args, model, tokenizer, seed=args.seed, **extra)
    reward_funcs = get_reward_functions(args.reward_funcs)
    try:
        for start in tqdm(range(0, len(todo), args.prompts_per_shard), desc="collect", unit="shard"):
            indices = todo[start : start + args.prompts_per_shard]
            rows = _collect_shard(args, indices, problems, tokenizer, engine, ref_model, reward_funcs, render_prompt)
            writer.write(rows)
    finally:
        engine.close()
    return Path(args.output_dir)


def resolved_rollout(args: CollectArguments, rollout_args: RolloutArguments) -> RolloutArguments:
    """``rollout.backend: auto`` → an engine (``qalign.rollout.backend``): the one a folder being extended was
    collected with (its ``meta.json`` records it), else vllm where it can run, else hf."""
    from dataclasses import replace

    from qalign.data.rollouts import META_FILE
    from qalign.rollout.backend import AUTO, recorded_backend, resolve_backend

    if rollout_args.rollout_backend != AUTO:
        return rollout_args
    recorded = recorded_backend([Path(args.output_dir) / META_FILE], lambda meta: meta["rollout_backend"])
    return replace(rollout_args, rollout_backend=resolve_backend(AUTO, recorded=recorded))


def _collect_shard(args, indices, problems, tokenizer, engine, ref_model, reward_funcs, render_prompt) -> list[dict]:
    from qalign.data.rollouts import reference_stats
    from qalign.rollout.base import SamplingConfig

    rows_in = problems.select(indices)
    turns = rows_in["messages"] if "messages" in rows_in.column_names else [None] * len(rows_in)
    prompts = [render_prompt(tokenizer, q, args.prompt_template, args.system_prompt, args.chat_template_kwargs, m)
               for q, m in zip(rows_in["question"], turns, strict=True)]  # fmt: skip
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    sampling = SamplingConfig(n=args.num_samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_tokens, seed=args.seed + indices[0])  # fmt: skip
    groups = engine.generate(prompt_ids, sampling)

    flat = [(i, j, c) for i, group in enumerate(groups) for j, c in enumerate(group)]
    table = {k: rows_in[k] for k in rows_in.column_names if k != "prompt"}
    columns = {k: [values[i] for i, _, _ in flat] for k, values in table.items()}
    completions = [c.text for _, _, c in flat]
    total = [0.0] * len(flat)
    for fn in reward_funcs:
        scores = fn(prompts=[prompts[i] for i, _, _ in flat], completions=completions,
                    completion_ids=[c.completion_ids for _, _, c in flat], **columns)  # fmt: skip
        total = [t + (0.0 if s is None else float(s)) for t, s in zip(total, scores)]

    rows = []
    for (i, j, c), reward in zip(flat, total):
        n = len(c.completion_ids)
        rewards = [0.0] * n
        if n:
            rewards[-1] = reward  # sequence reward on the last action
        rows.append({
            "prompt_index": indices[i], "sample_index": j, "prompt": prompts[i], "answer": str(table["answer"][i]),
            "completion": c.text, "prompt_ids": prompt_ids[i], "completion_ids": c.completion_ids,
            "action_mask": [1] * n, "rewards": rewards, "reward": reward,
            "behavior_logprobs": list(c.logprobs) if len(c.logprobs) == n else None, "finish_reason": c.finish_reason,
        })  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nonempty = [r for r in rows if r["completion_ids"]]
    for row, stats in zip(nonempty, reference_stats(ref_model, nonempty, pad, args.ref_batch_size)):
        row.update(stats)
    for row in rows:
        row.setdefault("ref_logprobs", [])
        row.setdefault("ref_lse", [])
    return rows


# ----------------------------------------------------------------------------- config


SPEC = ConfigSpec(
    name="collect", classes=(CollectArguments, SamplingRolloutArguments), sections=("rollout", "reward"),
    usage="usage: python -m qalign.collect --config X.yaml [--key value ...]",
)  # fmt: skip


def parse_collect_args(argv: list[str] | None = None, **overrides: Any) -> tuple[CollectArguments, RolloutArguments]:
    """``--config X.yaml --key value …`` (plus keyword overrides, under the command line) → the two
    argument dataclasses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    collect_args, rollout_args = load_config(argv, SPEC, overrides)
    return collect_args, rollout_args


def collect_from_yaml(path: str, **overrides: Any) -> Path:
    """Run the collection a YAML file describes (what ``OfflineConfig.collect_config`` points to)."""
    return collect(*parse_collect_args(["--config", path], **overrides))
