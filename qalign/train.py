"""``python -m qalign.train --config X.yaml [--key value …]`` (also under ``accelerate launch``).

parse config → model + tokenizer → datasets → rewards → held-out accuracy → train → accuracy → save.
Ends with the one-line summary ``before: <acc> after: <acc>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator

from qalign.checkpoints import resolve_resume
from qalign.config import DEBUG_ENV, ConfigError, exit_on_config_error
from qalign.train_config import LoadedConfig, parse_config

logger = logging.getLogger("qalign.train")


def load_policy(loaded: LoadedConfig):
    """The policy and its tokenizer with TRL's ModelConfig options (revision, remote code, attention, k-bit).

    π_ref follows them too: TRL builds it from the policy's id with the policy's dtype and attention and with
    ``training.model_init_kwargs`` (set here to the revision); Q# cuts its value model with the same options."""
    from qalign.models import load_model, load_tokenizer, model_init_kwargs, tokenizer_kwargs

    model_args, training = loaded.model, loaded.training
    tokenizer = load_tokenizer(model_args.model_name_or_path, **tokenizer_kwargs(model_args))
    options = model_init_kwargs(model_args)
    model = load_model(model_args.model_name_or_path, model_args.dtype or "float32", **options)
    if "revision" in options and getattr(training, "model_init_kwargs", None) is None:
        training.model_init_kwargs = {"revision": options["revision"]}
    return model, tokenizer


def build_datasets(loaded: LoadedConfig, tokenizer):
    """Train split with a rendered ``prompt`` column (what TRL samples from) and the held-out split."""
    from qalign.data import load_math_split, render_prompt

    script = loaded.script
    # TRL's own key: TRL applies it only to conversational prompts it renders; qalign renders every prompt.
    chat_template_kwargs = getattr(loaded.training, "chat_template_kwargs", None)
    if isinstance(chat_template_kwargs, str):
        chat_template_kwargs = json.loads(chat_template_kwargs)

    def with_prompt(split: str, limit: int | None):
        data = load_math_split(
            script.dataset_name, split, script.dataset_config, script.question_column, script.answer_column, limit
        )
        rendered = data.map(lambda row: {"prompt": render_prompt(tokenizer, row["question"], script.prompt_template,
                                                                 script.system_prompt, chat_template_kwargs,
                                                                 row.get("messages"))})  # fmt: skip
        # The rendered text is the prompt now; a "messages" column left in would make TRL take the rows for
        # conversational ones and apply the chat template a second time.
        return rendered.remove_columns(["messages"]) if "messages" in rendered.column_names else rendered

    train = with_prompt(script.dataset_train_split, script.max_train_samples)
    heldout = with_prompt(script.dataset_test_split, script.eval_samples) if script.eval_samples > 0 else None
    return train, heldout


def evaluate(trainer_or_model, tokenizer, heldout, loaded: LoadedConfig, desc: str) -> float | None:
    """Greedy accuracy on the held-out split, sharded across processes and gathered."""
    if heldout is None:
        return None
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from qalign.eval.accuracy import heldout_accuracy

    state = PartialState()
    fallback = "accuracy_last_number" in loaded.script.reward_funcs
    max_tokens = loaded.script.eval_max_tokens or loaded.training.max_completion_length
    batch_size = max(loaded.training.per_device_eval_batch_size, 16)
    indices = list(range(len(heldout)))
    with state.split_between_processes(indices) as mine:
        rows = heldout.select(mine)
        with heldout_engine(trainer_or_model, tokenizer, batch_size) as engine:
            accuracy = heldout_accuracy(
                engine,
                tokenizer,
                rows["prompt"],
                rows["answer"],
                max_tokens,
                fallback_last_number=fallback,
                desc=desc,
                show_progress=state.is_local_main_process,
            )
            kl = engine.kl_summary() if hasattr(engine, "kl_summary") else None
    counts = gather_object([(accuracy * len(mine), len(mine))])
    if kl is not None and state.is_main_process:
        # A guided policy (Q#) reports how far it moved from π_ref on the states it visited.
        print(f"qalign: KL(guided || pi_ref) on the held-out prompts: {kl['kl_per_token']:.4f} per token, "
              f"{kl['kl_per_sequence']:.3f} per sequence (rank 0)", flush=True)  # fmt: skip
    return sum(c for c, _ in counts) / max(sum(n for _, n in counts), 1)


@contextlib.contextmanager
def heldout_engine(trainer_or_model, tokenizer, batch_size: int):
    """The policy "after" means: a trainer's own ``heldout_policy_engine`` (Q#'s guided π_ref), else greedy
    decoding of the trained LM."""
    from qalign.rollout import HFEngine

    if hasattr(trainer_or_model, "heldout_policy_engine"):
        with trainer_or_model.heldout_policy_engine(tokenizer, batch_size) as engine:
            yield engine
        return
    with _generation_model(trainer_or_model) as model:
        yield HFEngine(model, tokenizer, batch_size=batch_size)


def _generation_model(trainer_or_model):
    """The model to generate with: unwrapped and whole (ZeRO-3 gathered, FSDP2 unsharded) on every process."""
    from qalign.distributed import full_parameters, trainer_model_for_generation

    if hasattr(trainer_or_model, "accelerator"):
        return trainer_model_for_generation(trainer_or_model)
    return full_parameters(trainer_or_model)  # under ZeRO-3 a model loaded for training is partitioned


def build_trainer(loaded: LoadedConfig, model, tokenizer, train_dataset, reward_funcs):
    """The registered trainer for ``loaded.algorithm``.

    A trainer that needs more than the online GRPO-style arguments (an offline dataset, a value
    model) builds itself with a ``from_qalign_config(loaded, model, tokenizer, train_dataset,
    reward_funcs)`` classmethod; the rest are built here like TRL's GRPOTrainer.
    """
    from trl import get_peft_config

    from qalign.trainers.registry import trainer_class

    cls = trainer_class(loaded.algorithm)
    if hasattr(cls, "from_qalign_config"):
        return cls.from_qalign_config(loaded, model, tokenizer, train_dataset, reward_funcs)
    return cls(
        model=model,
        reward_funcs=reward_funcs,
        args=loaded.training,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(loaded.model),
        rollout_args=loaded.rollout,
    )


@contextlib.contextmanager
def exit_on_full_disk(output_dir: str) -> Iterator[None]:
    """A write that failed for lack of space ends the run with one line saying what a rerun resumes from
    (exit status 1; --debug or QALIGN_DEBUG=1 shows the traceback)."""
    try:
        yield
    except Exception as error:
        from qalign.checkpoints import disk_full_message, is_disk_full, latest_complete_checkpoint

        latest = latest_complete_checkpoint(output_dir)  # once: the checkpoints it skips are logged once
        if not is_disk_full(error, output_dir, latest) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            raise
        print(disk_full_message(output_dir, latest), file=sys.stderr, flush=True)
        raise SystemExit(1) from None


@contextlib.contextmanager
def exit_on_lost_rollouts() -> Iterator[None]:
    """Every rollout worker failed (the trainer has checkpointed the finished steps): one line saying what
    to resume from, exit status 1 (--debug or QALIGN_DEBUG=1 shows the traceback)."""
    from qalign.rollout.base import RolloutUnavailable

    try:
        yield
    except RolloutUnavailable as error:
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            raise
        print(f"qalign: rollout: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> dict[str, float | None]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # config lines log too
    with exit_on_config_error():  # a refused value (beta <= 0, …) is one line naming the key, not a traceback
        loaded = parse_config(argv)
    # Errors written for a user that only show once the data or a checkpoint is read: one line too.
    with exit_on_config_error(catch=(ConfigError,)):
        return _train(loaded)


def _train(loaded: LoadedConfig) -> dict[str, float | None]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from qalign.reward import get_reward_functions

    training, script = loaded.training, loaded.script
    model, tokenizer = load_policy(loaded)
    train_dataset, heldout = build_datasets(loaded, tokenizer)
    reward_funcs = get_reward_functions(script.reward_funcs, timeout=script.reward_timeout)

    before = evaluate(model, tokenizer, heldout, loaded, "accuracy before")
    trainer = build_trainer(loaded, model, tokenizer, train_dataset, reward_funcs)
    trainer.card_base_model, trainer.card_dataset = loaded.model.model_name_or_path, script.dataset_name
    if trainer.accelerator.is_main_process:
        count = trainer.accelerator.num_processes
        print(
            f"qalign: {loaded.algorithm} on {count} process{'es' if count > 1 else ''} "
            f"({trainer.accelerator.distributed_type.value})",
            flush=True,
        )
    # true: the latest *complete* checkpoint (one cut short by a kill is skipped, with a warning naming it).
    with exit_on_full_disk(training.output_dir), exit_on_lost_rollouts():
        trainer.train(resume_from_checkpoint=resolve_resume(training.resume_from_checkpoint, training.output_dir))
        trainer.save_model(training.output_dir)
    trainer.create_model_card()  # README.md: the method, its paper, base model, data, hyperparameters
    trainer.save_state()  # trainer_state.json: the logged history (e.g. completion lengths) beside the model
    after = evaluate(trainer, tokenizer, heldout, loaded, "accuracy after")
    if trainer.accelerator.is_main_process:
        fmt = lambda value: "n/a" if value is None else f"{value:.3f}"
        print(f"before: {fmt(before)} after: {fmt(after)}", flush=True)
    # To report_to's trackers through the trainer's own integration callbacks (not trainer.log, which
    # TRL's trainers extend with their buffered training metrics); "eval_" keys land under "eval/".
    accuracy = {f"eval_heldout_accuracy_{when}": value for when, value in (("before", before), ("after", after))
                if value is not None}  # fmt: skip
    if accuracy:
        trainer.control = trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, accuracy)
    # Trackers closed and the process group torn down before the interpreter exits: a group left to
    # interpreter shutdown has been seen to abort a finished run ("terminate called without an active
    # exception") under DeepSpeed on CPU.
    trainer.accelerator.end_training()
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
    from qalign.distributed import exit_without_teardown

    exit_without_teardown(0)
