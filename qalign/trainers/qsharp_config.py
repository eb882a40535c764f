"""``QSharpConfig``: the value model's TrainingArguments (defaults: the paper's App. E) plus Q#'s collection,
guidance and diagnostics settings. Kept apart from the trainer so the config can be read without it."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from qalign.decoding.collect_qsharp import PREFIX_MODES
from qalign.decoding.guided import GuidanceConfig
from qalign.losses.qsharp import GUIDANCE_MODES, NORMALIZERS, VALUE_HEADS
from qalign.trainers.device import apply_device_defaults
from qalign.value_model import VALUE_TYPES, ValueHeadConfig


@dataclass
class QSharpConfig(TrainingArguments):
    """TrainingArguments of the value model (defaults: the paper's App. E) plus Q#'s collection and guidance."""

    # ---- value model
    value_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Trunk of the value model: any causal LM sharing the reference's tokenizer "
            "(default: the reference model itself)."
        },
    )
    value_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the trunk's first N layers: a small value model that makes guided "
            "decoding cheap (default: all layers)."
        },
    )
    value_type: str = field(
        default="v",
        metadata={
            "help": f"One of {VALUE_TYPES}. 'v' (paper default): the head reads the hidden state of prefix+a; "
            "'q': one head output per vocabulary token, initialised from lm_head."
        },
    )
    value_head: str = field(
        default="bernoulli",
        metadata={
            "help": f"One of {VALUE_HEADS}: Bernoulli p̂ trained with BCE (rewards in [0, 1]), or a "
            "histogram over num_atoms atoms on [v_min, v_max] trained with MLE (any bounded reward)."
        },
    )
    num_atoms: int = field(default=11, metadata={"help": "Histogram atoms (paper: 11)."})
    v_min: float = field(default=0.0, metadata={"help": "Smallest histogram atom."})
    v_max: float = field(default=1.0, metadata={"help": "Largest histogram atom."})
    value_loss_normalizer: str = field(
        default="token",
        metadata={
            "help": f"One of {NORMALIZERS}: average the loss over all trained tokens (the paper's objective, "
            "unbiased per (s, a)) or per sequence first (the authors' code)."
        },
    )
    retrain_each_iteration: bool = field(
        default=True,
        metadata={
            "help": "Each iteration refits the value model from its initial weights on all data so far "
            "(the authors' code); False: continue from the previous iteration's weights."
        },
    )
    # ---- guidance
    eta: float = field(
        default=0.1,
        metadata={
            "help": "KL weight η of the paper: π ∝ π_ref·E[exp(z/η)]. (The authors' --eta is 1/η: "
            "their --eta 10 is η = 0.1.)"
        },
    )
    guidance: str = field(
        default="qsharp",
        metadata={
            "help": f"One of {GUIDANCE_MODES}: 'qsharp' reweights by E[exp(z/η)], 'cd' by exp(E[z]/η) "
            "(the CD/VAS baseline)."
        },
    )
    guidance_top_k: int = field(
        default=20,
        metadata={"help": "Candidates (top-k of π_ref) the value model scores per step; <= 0: the whole vocabulary."},
    )
    guidance_non_candidate_offset: str = field(
        default="candidate_min",
        metadata={
            "help": "Offset of the tokens outside the top-k: 'candidate_min' (no better than the worst "
            "candidate, the authors' rule) or 'z_min' (surely the worst outcome)."
        },
    )
    guidance_use_cache: bool = field(
        default=True,
        metadata={
            "help": "Score candidates against the value model's own KV cache (fast); False: rescore "
            "prefix+candidate from scratch each step (reference path, same tokens)."
        },
    )
    # ---- collection (Algorithm 1)
    num_iterations: int = field(default=2, metadata={"help": "Collect → train rounds (paper: 2)."})
    num_samples_per_prompt: int = field(
        default=4, metadata={"help": "Roll-ins per training prompt and iteration (authors: 16)."}
    )
    max_completion_length: int = field(
        default=256,
        metadata={
            "help": "Token budget of a response (roll-in + roll-out); also the budget of the before/after "
            "evaluation in `qalign.train`."
        },
    )
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of collection (paper: 0.8)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling of collection (paper: 0.9)."})
    prefix_mode: str = field(
        default="all",
        metadata={
            "help": f"One of {PREFIX_MODES}: train every post-switch token ('all', the paper's) or only the "
            "switch token ('single', the ablation)."
        },
    )
    drop_no_variation: bool = field(
        default=True, metadata={"help": "Drop prompts whose samples all got the same reward (authors' default)."}
    )
    collection_chunk_size: int = field(
        default=16, metadata={"help": "Prompts per resumable collection chunk (one generate call)."}
    )
    collection_batch_size: int = field(
        default=16, metadata={"help": "Sequences per HF generate batch in collection and guided evaluation."}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Where collected JSONL goes (default: <output_dir>/qsharp_data)."}
    )
    # ---- diagnostics
    diagnostics_holdout_fraction: float = field(
        default=0.2,
        metadata={
            "help": "Share of the training prompts (chosen by hashing seed and prompt index) whose roll-outs "
            "never enter a fit. Each iteration scores the value model on their new roll-outs against the "
            "best constant predictor (held-out loss, AUROC, KL of a constant value model). 0: off."
        },
    )
    # ---- changed TrainingArguments defaults (paper App. E)
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate (paper: 2e-5)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (paper: 0.01)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Paper: constant."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Value-model epochs per iteration (paper: 5)."})
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient clipping (paper: 5.0)."})
    save_strategy: str = field(
        default="no",
        metadata={
            "help": "Intermediate checkpoints of the value-model fit. Q# resumes per iteration instead: "
            "collection chunk by chunk, and an iteration whose value model was saved is skipped."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator reads the example columns itself."}
    )

    def __post_init__(self) -> None:
        apply_device_defaults(self)
        super().__post_init__()
        checks = [
            (self.value_type in VALUE_TYPES, f"value_type must be one of {VALUE_TYPES}"),
            (self.value_head in VALUE_HEADS, f"value_head must be one of {VALUE_HEADS}"),
            (self.guidance in GUIDANCE_MODES, f"guidance must be one of {GUIDANCE_MODES}"),
            (self.prefix_mode in PREFIX_MODES, f"prefix_mode must be one of {PREFIX_MODES}"),
            (self.value_loss_normalizer in NORMALIZERS, f"value_loss_normalizer must be one of {NORMALIZERS}"),
            (self.eta > 0, "eta must be > 0"),
            (self.num_iterations >= 1, "num_iterations must be >= 1"),
            (0.0 <= self.diagnostics_holdout_fraction < 1.0, "diagnostics_holdout_fraction must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def guidance_config(self) -> GuidanceConfig:
        return GuidanceConfig(eta=self.eta, top_k=self.guidance_top_k, mode=self.guidance,
                              non_candidate_offset=self.guidance_non_candidate_offset,
                              use_cache=self.guidance_use_cache)  # fmt: skip

    def head_config(self) -> ValueHeadConfig:
        return ValueHeadConfig(head=self.value_head, value_type=self.value_type, num_atoms=self.num_atoms,
                               v_min=self.v_min, v_max=self.v_max, num_layers=self.value_num_layers)  # fmt: skip
