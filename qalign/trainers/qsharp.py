"""Q#: distributional value model + value-guided decoding (Zhou et al., "Q♯: Provably Optimal
Distributional RL for LLM Post-Training", arXiv 2502.20548, NeurIPS 2025).

π_ref stays frozen. Each iteration k collects data with the guided policy π^k (Algorithm 1: roll in with
π^k, roll out with π_ref, label every post-switch token with the final reward), aggregates it with the
earlier rounds, and fits a value model Z_θ(s,a) to π_ref's reward-to-go by supervised learning (BCE for a
Bernoulli head, MLE for a histogram head). The result is the guided policy
π^{Z,η}(a|s) ∝ π_ref(a|s)·E_{z~Z_θ(s,a)}[exp(z/η)], saved as ``guided_policy.json`` + ``value_model/``.

Example::

    from qalign.trainers.qsharp import QSharpConfig, QSharpTrainer

    trainer = QSharpTrainer(
        value_model="smollm2-135m-instruct",           # trunk source (here: π_ref itself, cut below)
        args=QSharpConfig(output_dir="out", value_num_layers=6, num_iterations=2, eta=0.1),
        ref_model=ref, processing_class=tokenizer,
        prompts=dataset,                                # a "prompt" column plus the reward's columns
        reward_funcs=[accuracy_reward],
    )
    trainer.train()                                     # iterations × (collect → train value model)
    trainer.save_model("out")                           # out/value_model + out/guided_policy.json
    engine = trainer.heldout_policy_engine(tokenizer)   # a RolloutEngine sampling π^{Z,η}
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, set_seed
from transformers.trainer_utils import TrainOutput

from qalign.decoding.collect_qsharp import CollectionSettings, collect_iteration, load_examples, refuse_changed_problems
from qalign.decoding.guided import POLICY_FILE, GuidedEngine, save_guided_policy
from qalign.distributed import (
    full_parameters,
    full_state_dict,
    guard_interpreter_exit,
    load_full_state_dict,
    trainer_model_for_generation,
)
from qalign.losses.qsharp import expected_value, value_loss
from qalign.losses.qsharp_diagnostics import heldout_prompt_indices
from qalign.trainers.device import token_mean_across_processes
from qalign.trainers.model_card import ModelCardMixin
from qalign.trainers.qsharp_collator import ValueCollator
from qalign.trainers.qsharp_config import QSharpConfig
from qalign.trainers.qsharp_diagnostics import ValueDiagnosticsMixin
from qalign.value_model import CONFIG_NAME, QSharpValueModel

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["VALUE_MODEL_DIR", "QSharpConfig", "QSharpTrainer", "ValueCollator"]  # the config and collator live apart

logger = logging.getLogger(__name__)

VALUE_MODEL_DIR = "value_model"
# What push_to_hub uploads: the guided policy as save_model writes it, and its card.
PUSHED_FILES = (POLICY_FILE, f"{VALUE_MODEL_DIR}/*", "README.md")
# Collected data and saved iterations go together: starting one over without the other would mix settings.
RESTART = "another output_dir (and another data_dir, if you set one)"


class QSharpTrainer(ValueDiagnosticsMixin, ModelCardMixin, Trainer):
    """A ``transformers.Trainer`` for the value model whose ``train()`` runs Q#'s iterations:
    collect with π^k → fit the value model on the aggregated data → π^{k+1}.

    Args:
        value_model: a ``QSharpValueModel``, or the id/folder of the trunk to build one from.
        ref_model: π_ref (frozen; never updated here).
        prompts: dataset with a rendered ``prompt`` column plus whatever the reward functions read (``answer``).
        reward_funcs: TRL-signature reward functions; their sum is the trajectory reward.
        ref_engine: samples π_ref's roll-outs (any ``RolloutEngine``, vLLM included); default: HF generate. A
            ``VLLMEngine`` started with ``guided_requests_kwargs()`` samples the guided roll-ins too.
        reference_id: how ``guided_policy.json`` names π_ref (default: its ``name_or_path``).
    """

    _tag_names = ["qalign", "qsharp"]
    _method = "qsharp"

    def __init__(
        self,
        value_model: QSharpValueModel | str,
        args: QSharpConfig,
        ref_model: torch.nn.Module,
        processing_class,
        prompts: Dataset,
        reward_funcs: list,
        ref_engine=None,
        reference_id: str | None = None,
        peft_config=None,
        callbacks=None,
    ):
        if isinstance(value_model, str):
            set_seed(args.seed)
            value_model = QSharpValueModel.from_reference(value_model, args.head_config(), peft_config=peft_config)
        pad = (
            processing_class.pad_token_id
            if processing_class.pad_token_id is not None
            else processing_class.eos_token_id
        )
        super().__init__(model=value_model, args=args, data_collator=ValueCollator(pad, args.prefix_mode),
                         processing_class=processing_class, callbacks=callbacks)  # fmt: skip
        if self.accelerator.num_processes > 1:
            guard_interpreter_exit()
        self.ref_model = ref_model.eval().requires_grad_(False)
        self.prompts = prompts
        self.reward_funcs = list(reward_funcs)
        self.guidance = args.guidance_config()
        self.reference_id = reference_id or getattr(ref_model, "name_or_path", None) or ref_model.config.name_or_path
        if ref_engine is None:
            from qalign.rollout.hf import HFEngine

            ref_engine = HFEngine(self.ref_model, processing_class, batch_size=args.collection_batch_size)
        self.ref_engine = ref_engine
        # Initial weights, on CPU, for refitting from scratch each iteration.
        self._initial_state = None
        if args.retrain_each_iteration and args.num_iterations > 1:
            with full_parameters(value_model):  # ZeRO-3 partitions at load: gather to copy
                self._initial_state = {k: v.detach().to("cpu", copy=True) for k, v in value_model.state_dict().items()}
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._columns = {c: list(prompts[c]) for c in prompts.column_names}
        self._prompt_ids = [processing_class(p, add_special_tokens=False)["input_ids"] for p in self._columns["prompt"]]
        # What the rewards grade each prompt against (its gold answer, ...): kept in the collected rows.
        self._reward_columns = [
            {c: values[i] for c, values in self._columns.items() if c != "prompt"} for i in range(len(self._prompt_ids))
        ]
        # Prompts whose roll-outs never enter a fit: each iteration scores the value model on their new ones.
        self.heldout_prompts = heldout_prompt_indices(
            len(self._prompt_ids), args.diagnostics_holdout_fraction, args.seed
        )
        # One dict per iteration run here: collection numbers, then the diagnostics of the fitted value model.
        self.iteration_stats: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ construction from qalign.train

    @classmethod
    def from_qalign_config(cls, loaded, model, tokenizer, train_dataset, reward_funcs):
        """Build from ``qalign.train``'s parsed config: ``model`` is π_ref, the value model is cut from
        ``value_model_name_or_path`` (default: the same model), π_ref's roll-outs go through ``rollout.backend``."""
        from trl import get_peft_config

        from qalign.models import load_tokenizer, model_init_kwargs
        from qalign.rollout.factory import build_engine

        args: QSharpConfig = loaded.training
        reference = loaded.model.model_name_or_path
        source = args.value_model_name_or_path or reference
        if source != reference and load_tokenizer(source).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"value model {source!r} does not share the reference's tokenizer ({reference!r})")
        peft_config = get_peft_config(loaded.model)
        dtype = loaded.model.dtype or "float32"
        set_seed(args.seed)  # the head's random init, before Trainer seeds anything
        value_model = QSharpValueModel.from_reference(source, args.head_config(), dtype, peft_config,
                                                      **model_init_kwargs(loaded.model))  # fmt: skip
        overrides = {"batch_size": args.collection_batch_size} if loaded.rollout.rollout_backend == "hf" else {}
        if loaded.rollout.rollout_backend == "vllm":
            from qalign.decoding.vllm_guided import guided_requests_kwargs

            # π_ref's engine takes the Q# processor too: it samples the guided roll-ins of iteration k > 1 with
            # the value model iteration k − 1 saved, batched by vLLM instead of HF generate's fixed batches.
            overrides |= guided_requests_kwargs(dtype)
        max_len = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in train_dataset["prompt"])
        # vLLM starts from π_ref's weights written to a folder; under ZeRO-3 π_ref was partitioned when loaded
        # (every process holds empty shards), so gather first, as GRPO does. A collective: every process builds.
        with full_parameters(model) as whole:
            ref_engine = build_engine(loaded.rollout, whole, tokenizer, seed=args.seed,
                                      max_model_len=max_len + args.max_completion_length, **overrides)  # fmt: skip
        return cls(value_model, args, model, tokenizer, train_dataset, reward_funcs, ref_engine=ref_engine,
                   reference_id=reference)  # fmt: skip

    # ------------------------------------------------------------------ the outer loop

    @property
    def data_dir(self) -> Path:
        return Path(self.args.data_dir or Path(self.args.output_dir) / "qsharp_data")

    def value_model(self) -> QSharpValueModel:
        return self.accelerator.unwrap_model(self.model)

    def guided_engine(self, batch_size: int | None = None, value_model: QSharpValueModel | None = None) -> GuidedEngine:
        """π^{Z,η} with the current value model (a ``RolloutEngine``). Under ZeRO-3, use it inside
        ``full_models()``, which passes the gathered value model."""
        batch_size = batch_size or self.args.collection_batch_size
        value_model = value_model if value_model is not None else self.value_model()
        return GuidedEngine(self.ref_model, value_model, self.processing_class, self.guidance, batch_size)

    @contextlib.contextmanager
    def full_models(self):
        """Inside: π_ref and the value model with their full parameters (yields the value model).

        Under ZeRO-3 both were partitioned when loaded, and after a fit the value model sits in a DeepSpeed
        engine whose hooks would re-partition it mid-generation: TRL's unwrap takes them off. A collective:
        every process enters.
        """
        with full_parameters(self.ref_model), trainer_model_for_generation(self) as value_model:
            yield value_model

    @contextlib.contextmanager
    def heldout_policy_engine(self, tokenizer=None, batch_size: int | None = None):
        """The engine ``qalign.train`` evaluates as "after": the guided policy, not the value model."""
        with self.full_models() as value_model:
            engine = self.guided_engine(batch_size, value_model)
            if tokenizer is not None:
                engine.tokenizer = tokenizer
            yield engine

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """Run the remaining iterations. Resumes on its own from ``output_dir``: iterations whose value model
        was saved are skipped and an interrupted collection continues where it stopped
        (``resume_from_checkpoint`` is accepted for ``qalign.train``'s sake; HF checkpoints are not used)."""
        args = self.args
        done = self._last_saved_iteration()
        if done:
            logger.info("Q#: iterations 1..%d already done in %s", done, args.output_dir)
            self._load_iteration(done)
        output = TrainOutput(self.state.global_step, 0.0, {})
        heldout = set(self.heldout_prompts)
        history: list[dict[str, Any]] = []
        for k in range(done + 1, args.num_iterations + 1):
            self._collect(k)
            examples = load_examples(self._data_files(k), args.drop_no_variation)
            examples = [e for e in examples if e["prompt_index"] not in heldout]
            if not examples:
                raise ValueError(f"Q# iteration {k}: no training examples (every prompt's samples got the same "
                                 "reward; set drop_no_variation: false or use more samples)")  # fmt: skip
            self._check_rewards(examples)
            from datasets import Dataset

            self.train_dataset = Dataset.from_list(
                [
                    {"prefix_ids": e["prefix_ids"], "target_ids": e["target_ids"], "reward": e["reward"]}
                    for e in examples
                ]
            )
            if k > 1 and self._initial_state is not None:
                load_full_state_dict(self.value_model(), self._initial_state)
            self.optimizer, self.lr_scheduler = None, None  # a fresh optimizer per fit
            # Collection drew from each process's RNG differently (its own chunks); the fit's data order
            # must not depend on that, or processes would shuffle differently and share examples.
            set_seed(args.seed + k)
            self.model_wrapped = self.model
            logger.info(
                "Q# iteration %d/%d: fitting the value model on %d examples", k, args.num_iterations, len(examples)
            )
            output = super().train(**kwargs)
            self._save_iteration(k)  # before the diagnostics: they only observe, the fit must not be lost
            if heldout:
                self._diagnose(k, examples)
            # Each fit starts a fresh TrainerState: carry the earlier iterations' logs (diagnostics included)
            # over, so log_history and trainer_state.json hold every iteration, not just the last.
            history += self.state.log_history
            self.state.log_history = list(history)
        self._close_ref_engine()
        return output

    def _close_ref_engine(self) -> None:
        """Every iteration is collected: release π_ref's sampler (vLLM's memory and threads). A vLLM engine
        left to the interpreter's exit tears down its process group there and prints a traceback after a
        run that succeeded. HF's engine is π_ref itself, which the guided policy still decodes with."""
        if getattr(self.ref_engine, "backend", "hf") != "hf" and hasattr(self.ref_engine, "close"):
            self.ref_engine.close()

    def _collect(self, k: int) -> None:
        args, accelerator = self.args, self.accelerator
        settings = CollectionSettings(num_samples=args.num_samples_per_prompt, max_tokens=args.max_completion_length,
                                      temperature=args.temperature, top_p=args.top_p,
                                      chunk_size=args.collection_chunk_size, seed=args.seed)  # fmt: skip
        from qalign.rollout.hf import eos_token_ids

        tokenizer = self.processing_class
        # The fit aggregates every iteration's rows: earlier ones of problems changed since are refused as well,
        # before any model is gathered or sampled.
        refuse_changed_problems(self._data_files(k - 1), self._prompt_ids, self._reward_columns, RESTART)
        with self.full_models() as value_model:
            rollin = None if k == 1 else self._rollin_engine(k, value_model)
            description = {"reference": self.reference_id, "guidance": vars(self.guidance) if rollin else None}
            if getattr(rollin, "backend", "hf") != "hf":  # a resume never mixes roll-in samplers either
                description["rollin_backend"] = rollin.backend
            # π_ref's engine when not HF (HF runs' settings stay as they were): a resume never mixes engines.
            if getattr(self.ref_engine, "backend", "hf") != "hf":
                description["ref_backend"] = self.ref_engine.backend
            rows = collect_iteration(
                self._data_file(k, accelerator.process_index), self._prompt_ids, self.ref_engine, self._reward_fn,
                settings, iteration=k, rollin_engine=rollin,
                decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                eos_ids=eos_token_ids(self.ref_model, tokenizer), rank=accelerator.process_index,
                world_size=accelerator.num_processes, description=description, restart=RESTART,
                reward_columns=self._reward_columns,
            )  # fmt: skip
        accelerator.wait_for_everyone()
        stats = {"iteration": float(k), "rows": float(rows)}
        if isinstance(rollin, GuidedEngine) and rollin.kl_summary()["tokens"] > 0:  # vLLM's sampler reports no KL
            stats.update({f"rollin_{key}": value for key, value in rollin.kl_summary().items()})
        self.iteration_stats.append(stats)
        if accelerator.is_main_process:
            logger.info("Q# iteration %d: collected %s", k, stats)

    def _rollin_engine(self, k: int, value_model: QSharpValueModel):
        """π^k for iteration k's roll-ins: on π_ref's own vLLM engine when it was started with the Q# processor
        (from ``qalign.train``: ``rollout.backend: vllm``), with the value model iteration k − 1 saved; else
        HF generate with the value model in memory."""
        if getattr(self.ref_engine, "backend", "hf") == "vllm":
            from qalign.decoding.vllm_guided import GuidedRequests, accepts_guided_requests

            if accepts_guided_requests(self.ref_engine):
                return GuidedRequests(self.ref_engine, self._iteration_dir(k - 1), asdict(self.guidance))
        return self.guided_engine(value_model=value_model)

    def _data_file(self, k: int, rank: int) -> Path:
        return self.data_dir / f"iter{k:02d}.rank{rank}.jsonl"

    def _data_files(self, k: int) -> list[Path]:
        return sorted(p for j in range(1, k + 1) for p in self._iteration_files(j))

    def _iteration_files(self, k: int) -> list[Path]:
        return sorted(self.data_dir.glob(f"iter{k:02d}.rank*.jsonl"))

    def _reward_fn(self, indices: list[int], completion_ids: list[list[int]], texts: list[str]) -> list[float]:
        """Σ of the reward functions, called like TRL does (dataset columns as keyword lists)."""
        columns = {c: [values[i] for i in indices] for c, values in self._columns.items() if c != "prompt"}
        prompts = [self._columns["prompt"][i] for i in indices]
        total = [0.0] * len(indices)
        for function in self.reward_funcs:
            values = function(prompts=prompts, completions=texts, completion_ids=completion_ids, **columns)
            total = [t + (0.0 if v is None else float(v)) for t, v in zip(total, values)]
        return total

    def _check_rewards(self, examples: list[dict[str, Any]]) -> None:
        rewards = [e["reward"] for e in examples]
        if self.args.value_head == "bernoulli" and not all(0.0 <= r <= 1.0 for r in rewards):
            raise ValueError(f"a Bernoulli value head needs rewards in [0, 1], got [{min(rewards)}, {max(rewards)}]: "
                             "use value_head: histogram with v_min/v_max covering the rewards")  # fmt: skip

    # ------------------------------------------------------------------ per-iteration artifacts

    def _iteration_dir(self, k: int) -> Path:
        return Path(self.args.output_dir) / f"iter{k:02d}" / VALUE_MODEL_DIR

    def _last_saved_iteration(self) -> int:
        iterations = range(1, self.args.num_iterations + 1)
        return max((k for k in iterations if (self._iteration_dir(k) / CONFIG_NAME).is_file()), default=0)

    def _save_iteration(self, k: int) -> None:
        """Keep the value model of iteration k (the latest only: resuming needs nothing older)."""
        with self.full_models() as value_model:
            state = full_state_dict(value_model)
            if self.args.should_save:
                target = self._iteration_dir(k)
                staging = target.with_name(target.name + ".tmp")
                shutil.rmtree(staging, ignore_errors=True)
                value_model.save_pretrained(staging, state)
        if self.args.should_save:
            shutil.rmtree(target, ignore_errors=True)
            staging.replace(target)  # complete or absent: a crash mid-save cannot fake a finished iteration
            if k > 1:
                shutil.rmtree(self._iteration_dir(k - 1).parent, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _load_iteration(self, k: int) -> None:
        saved = QSharpValueModel.from_pretrained(self._iteration_dir(k))
        model = self.value_model()
        if hasattr(model.trunk, "peft_config"):
            raise ValueError("resuming a LoRA value model is not supported: delete the iteration folders to restart")
        load_full_state_dict(model, saved.state_dict())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``output_dir/value_model`` plus ``output_dir/guided_policy.json`` (reference id, value model, η, k); a
        checkpoint (``_internal_call``) gets the value model alone. With ``push_to_hub`` set, a final save is also
        pushed, as transformers' ``save_model`` does (``qalign.train`` pushes this way)."""
        self._write_policy(Path(output_dir or self.args.output_dir), checkpoint=_internal_call)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _write_policy(self, output_dir: Path, checkpoint: bool) -> None:
        """``value_model/`` + ``guided_policy.json`` in ``output_dir``; a checkpoint: the value model there alone."""
        target = output_dir if checkpoint else output_dir / VALUE_MODEL_DIR
        with self.full_models() as value_model:
            state = full_state_dict(value_model)
            if self.args.should_save:
                value_model.save_pretrained(target, state)
        if self.args.should_save:
            self.processing_class.save_pretrained(target)
            if not checkpoint:
                save_guided_policy(output_dir, str(self.reference_id), VALUE_MODEL_DIR, self.guidance,
                                   value_head=self.args.value_head, value_type=self.args.value_type,
                                   iterations=self.args.num_iterations)  # fmt: skip
        self.accelerator.wait_for_everyone()

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs: Any):  # fmt: skip
        """Upload the guided policy (``guided_policy.json``, ``value_model/``) and its card to ``hub_model_id``;
        the downloaded folder loads with ``qalign.policies.load_policy``.

        transformers' ``push_to_hub`` would save with its checkpoint flag (the value model alone, at the folder's
        root, without ``guided_policy.json``) and upload all of ``output_dir``, which for Q# also holds the
        collected roll-outs (``qsharp_data/``) and the latest iteration's copy of the value model (``iterNN/``).
        """
        from huggingface_hub import HfApi

        from qalign import __version__

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self._write_policy(Path(self.args.output_dir), checkpoint=False)  # a collective under ZeRO-3 / FSDP
        if not self.is_world_process_zero():
            return None
        self.create_model_card(model_name=kwargs.get("model_name"))
        return HfApi(library_name="qalign", library_version=__version__).upload_folder(
            repo_id=self.hub_model_id, folder_path=self.args.output_dir, commit_message=commit_message, token=token,
            run_as_future=not blocking, allow_patterns=list(PUSHED_FILES),
            revision=revision if revision is not None else self.args.hub_revision,
        )  # fmt: skip

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # transformers pushes output_dir at each checkpoint save (hub_strategy). A Q# checkpoint is one fit of the
        # value model, not a guided policy, and output_dir holds the roll-outs: Q# pushes when it saves the policy.
        return None

    # ------------------------------------------------------------------ loss and logging

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        head_output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        unwrapped = self.value_model()
        atoms = unwrapped.atoms
        loss = value_loss(
            head_output, inputs["rewards"], inputs["loss_mask"], unwrapped.head, atoms, self.args.value_loss_normalizer
        )
        if self.args.value_loss_normalizer == "token":
            loss = token_mean_across_processes(loss, inputs["loss_mask"].sum(), self.accelerator)
        with torch.no_grad():
            mask = inputs["loss_mask"].bool()
            predicted = expected_value(head_output.detach().float(), unwrapped.head, atoms)[mask]
            targets = inputs["rewards"].unsqueeze(1).expand_as(mask)[mask]
            self._metrics["qsharp/value_mean"].append(float(predicted.mean()) if predicted.numel() else 0.0)
            self._metrics["qsharp/reward_mean"].append(float(targets.mean()) if targets.numel() else 0.0)
        return (loss, head_output) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        averaged = {name: sum(v) / len(v) for name, v in self._metrics.items() if v}
        super().log({**logs, **averaged}, start_time)
        self._metrics.clear()
