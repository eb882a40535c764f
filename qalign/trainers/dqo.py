"""DQO: Direct Q-function Optimization, offline soft actor-critic in the token MDP (Ji, Liu et al.,
"Enhancing Multi-Step Reasoning Abilities of Language Models through Direct Q-Function Optimization",
arXiv 2410.09302 v2).

Q_{θ,φ}(s, a) = β ln π_θ(a|s)/π_ref(a|s) + V_φ(s): the policy is the LM, V_φ is either a scalar head on
the policy's last hidden state (``value_function="head"``; the features are detached, so L_V trains φ
only, as written) or a separate transformer trunk with its own head (``"model"``). Both live inside the trained module (attributes ``value_head`` and
``value_trunk``), so one optimizer, one DDP wrapper and one checkpoint cover them, and LoRA adapts
both (the head is trained fully through PEFT's ``modules_to_save``). The losses are
``qalign.losses.dqo_losses``; see docs/shiq_dqo.md for the choices the paper leaves open.

Example::

    trainer = DQOTrainer(
        model="path/or/hub-id",
        args=DQOConfig(output_dir="out", beta=0.1, lam=1.0, importance_sampling="cumulative"),
        train_dataset=load_rollouts("outputs/rollouts/arithmetic"),
    )
    trainer.train()
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qalign.losses.dqo import dqo_losses
from qalign.trainers.offline import (
    OfflineConfig,
    OfflineTrainer,
    TokenStats,
    completion_token_stats,
    unwrap_base,
)
from qalign.trainers.sft_anchor import add_sft_anchor

logger = logging.getLogger(__name__)

VALUE_MODULES = ("value_head", "value_trunk")
# The final model folder keeps V_φ apart from the LM's weights: vLLM refuses a checkpoint with parameters
# its architecture lacks ("no module or parameter named 'value_head'"), and transformers warns about them.
VALUE_FUNCTION_DIR = "value_function"


@dataclass
class DQOConfig(OfflineConfig):
    """OfflineConfig plus the λ-return, importance weights and the value function V_φ."""

    lam: float = field(default=1.0, metadata={"help": "λ of the λ-return, in [0, 1]; the paper found 1.0 beat 0.95."})
    importance_sampling: str = field(
        default="cumulative",
        metadata={
            "help": "Importance weights of π_θ against the sampler, detached and clipped: 'cumulative' "
            "(prefix ratio Π_{k≤h} π_θ/π_b), 'token' (π_θ/π_b of the token) or 'none'."
        },
    )
    is_clip: float = field(default=1.0, metadata={"help": "Upper clip c of the importance weights, > 0."})
    value_function: str = field(
        default="head",
        metadata={
            "help": "'head': a scalar head on the policy's last hidden state (detached: L_V trains the head "
            "only). 'model': a separate trunk (copied from the policy, or value_model_name_or_path) with its "
            "own head."
        },
    )
    value_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Trunk of the value model for value_function='model' (default: a copy of the policy's)."},
    )
    value_loss_coef: float = field(default=1.0, metadata={"help": "Weight of L_V in the summed loss L_π + c·L_V."})
    value_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of V_φ's own parameters (head, separate trunk) as a separate optimizer "
            "parameter group; default: learning_rate. A fresh zero-initialised head often wants more."
        },
    )
    value_init: str = field(
        default="zero",
        metadata={
            "help": "Where a fresh V_φ starts: 'zero' (V = 0, so at the first step L_π is SFT on the successful "
            "samples alone) or 'mean_return' (the head's bias at the training data's mean return, V's "
            "regression target while π_θ = π_ref, so failed samples are pushed down from the first step)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.importance_sampling not in ("none", "token", "cumulative"):
            raise ValueError(
                f"importance_sampling must be 'none', 'token' or 'cumulative', got {self.importance_sampling!r}"
            )
        if self.is_clip <= 0:
            raise ValueError(f"is_clip must be > 0, got {self.is_clip}")
        if self.value_function not in ("head", "model"):
            raise ValueError(f"value_function must be 'head' or 'model', got {self.value_function!r}")
        if self.value_init not in ("zero", "mean_return"):
            raise ValueError(f"value_init must be 'zero' or 'mean_return', got {self.value_init!r}")
        if self.ddp_find_unused_parameters is None:
            # Every trained parameter gets a gradient at every step (θ from L_π, φ from L_V). DDP's search
            # for unused ones walks back from the forward's outputs, which V_φ's are not part of: it
            # would count them unused and then fail when their gradient arrives.
            self.ddp_find_unused_parameters = False


class ValueHead(nn.Module):
    """V_φ(s) = w·h(s) + b on a hidden state; zero-initialised, so V starts at 0 (= V* for zero reward)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


def attach_value_function(model: nn.Module, kind: str = "head", value_trunk: nn.Module | None = None) -> nn.Module:
    """Add V_φ to ``model`` in place: ``model.value_head`` and, for ``kind="model"``, ``model.value_trunk``
    (``value_trunk`` or a deep copy of the policy's decoder trunk). Call before wrapping with PEFT.

    V_φ runs inside ``model``'s own forward (a forward hook, active within ``policy_stats_and_values``),
    so DDP, DeepSpeed and FSDP see its parameters used in the forward they wrap: DDP rejects parameters
    that first appear after it (``marked ready twice``), and ZeRO-3 gathers shards per forward.
    """
    if kind == "model":
        trunk = value_trunk if value_trunk is not None else copy.deepcopy(model.get_decoder())
        model.add_module("value_trunk", trunk)
        model.add_module("value_head", ValueHead(trunk.config.hidden_size))
    elif kind == "head":
        model.add_module("value_head", ValueHead(model.config.hidden_size))
    else:
        raise ValueError(f"value function must be 'head' or 'model', got {kind!r}")
    register_value_hook(model)
    return model


def mean_return(dataset, gamma: float = 1.0) -> float:
    """Mean over a token-form rollout dataset of the return from the first action, Σ_k γ^k r_k (k counts
    policy actions): V's regression target at s_0 while π_θ = π_ref, where the soft reward is r alone."""
    total = 0.0
    for rewards, mask in zip(dataset["rewards"], dataset["action_mask"], strict=True):
        discount, episode = 1.0, 0.0
        for reward, is_action in zip(rewards, mask, strict=True):
            if is_action:
                episode += discount * reward
                discount *= gamma
        total += episode
    return total / max(len(dataset), 1)


@torch.no_grad()
def set_value_bias(model: nn.Module, value: float) -> int:
    """Set the bias of every ValueHead in ``model`` (PEFT keeps an original and a trained copy) to ``value``;
    returns how many heads were set."""
    heads = [module for module in model.modules() if isinstance(module, ValueHead)]
    for head in heads:
        head.summary.bias.fill_(value)
    return len(heads)


def register_value_hook(model: nn.Module) -> None:
    """Let ``model``'s forward compute V_φ on request (once per model; attach_value_function calls it)."""
    if not hasattr(model, "_value_request"):
        model._value_request = None
        model.register_forward_hook(_value_forward_hook, with_kwargs=True)


def _value_forward_hook(module: nn.Module, args, kwargs, output):
    """Compute V_φ at every position of this forward's inputs when a caller asked for it."""
    request = getattr(module, "_value_request", None)
    if request is None:
        return None
    if hasattr(module, "value_trunk"):
        inputs = {k: kwargs[k] for k in ("input_ids", "attention_mask", "position_ids") if kwargs.get(k) is not None}
        hidden = module.value_trunk(**inputs, use_cache=False).last_hidden_state
    else:
        # Detached: L_V is a loss in φ alone, so V_φ reads the policy's features without training them
        # (a shared trunk trained by L_V as well cost the demo held-out accuracy: 0.42 → 0.30).
        hidden = output.hidden_states[-1].detach()
    request["values"] = module.value_head(hidden)
    return None


def policy_stats_and_values(
    model: nn.Module, batch: dict[str, torch.Tensor], owner: nn.Module | None = None
) -> tuple[TokenStats, torch.Tensor]:
    """One forward of ``model`` (wrapped or not) → the policy's per-token statistics and V_φ(s_t) ``(B, C)``
    at the states that produce each completion token.

    ``owner`` is the module holding the value function (default ``model``; wrappers such as DDP or PEFT
    hide the attributes of the model they wrap).
    """
    owner = model if owner is None else owner
    request: dict[str, torch.Tensor] = {}
    owner._value_request = request
    try:
        stats = completion_token_stats(model, batch, hidden=not hasattr(owner, "value_trunk"))
    finally:
        owner._value_request = None
    width_c = batch["completion_ids"].size(1)
    return stats, request["values"][:, -width_c - 1 : -1]


def dqo_batch_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], args: DQOConfig, owner: nn.Module | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(L_π + value_loss_coef · L_V, detached metrics) on one collated rollout batch.

    ``owner`` is the module holding the value function (default ``model``; the trainer passes the
    unwrapped base model, since DDP/PEFT wrappers hide attributes).
    """
    stats, values = policy_stats_and_values(model, batch, owner)
    mask = batch["action_mask"].bool()
    out = dqo_losses(
        stats.logprobs, batch["ref_logprobs"], values, batch["rewards"], mask,
        beta=args.beta, gamma=args.gamma, lam=args.lam, behavior_logprobs=batch.get("behavior_logprobs"),
        importance_sampling=args.importance_sampling, is_clip=args.is_clip,
        normalizer=args.loss_normalizer, max_length=args.max_completion_length,
    )  # fmt: skip
    loss = out.policy_loss + args.value_loss_coef * out.value_loss
    loss, anchor = add_sft_anchor(loss, stats.logprobs, batch, args)
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        first = mask.float().argmax(dim=1)  # first action: V_φ at the prompt's end, V_φ(x)
        metrics = {
            "dqo/policy_loss": out.policy_loss.detach(),
            "dqo/value_loss": out.value_loss.detach(),
            "dqo/value_prompt": values.gather(1, first.unsqueeze(1)).mean(),
            "dqo/lambda_return_prompt": out.lambda_return.gather(1, first.unsqueeze(1)).mean(),
            "dqo/is_weight": (out.weights * mask).sum() / count,
            "dqo/log_ratio": ((stats.logprobs - batch["ref_logprobs"]) * mask).sum() / count,
            "dqo/reward": batch["rewards"].sum(dim=1).mean(),
        }
        if anchor is not None:
            metrics["dqo/sft_nll"] = anchor.detach()
    return loss, metrics


def is_value_parameter(name: str) -> bool:
    return any(module in name.split(".") for module in VALUE_MODULES)


def move_value_function_out(folder: str | Path) -> list[str]:
    """Move V_φ's tensors out of a saved full model's ``*.safetensors`` into ``folder/value_function/``,
    so that the folder loads as a plain causal LM in transformers and vLLM. Returns the moved names;
    adapter folders (``adapter_model.safetensors``, where PEFT keeps the head) are left as they are."""
    from safetensors.torch import load_file, save_file

    from qalign.atomic import atomic_path

    folder = Path(folder)
    moved: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        tensors = load_file(str(shard))
        value = {name: tensors.pop(name) for name in [n for n in tensors if is_value_parameter(n)]}
        if not value:
            continue
        moved.update(value)
        with atomic_path(shard) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    if not moved:
        return []
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not is_value_parameter(k)}
        with atomic_path(index) as tmp:
            tmp.write_text(json.dumps(data, indent=2))
    (folder / VALUE_FUNCTION_DIR).mkdir(exist_ok=True)
    save_file(moved, str(folder / VALUE_FUNCTION_DIR / "model.safetensors"), metadata={"format": "pt"})
    return sorted(moved)


class DQOTrainer(OfflineTrainer):
    """Offline DQO on a rollout dataset. V_φ's parameters get ``value_learning_rate`` when set."""

    _tag_names = ["qalign", "dqo"]
    _method = "dqo"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.args.value_init == "mean_return":  # _prepare_model made sure V_φ is fresh
            start = mean_return(self.train_dataset, self.args.gamma)
            set_value_bias(self.model, start)
            logger.info("V_φ starts at the training data's mean return, %.4f", start)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        # Checkpoints keep V_φ inside (resume restores it); the final folder, saved or pushed to the Hub, is
        # what users serve and grade.
        if self.is_final_save(_internal_call) and self.args.should_save:
            move_value_function_out(output_dir or self.args.output_dir)

    def _prepare_model(self, model, args: DQOConfig, peft_config):
        if not hasattr(unwrap_base(model), "value_head"):
            trunk = None
            if args.value_function == "model":
                from transformers import AutoModel
                from transformers.integrations import is_deepspeed_zero3_enabled

                from qalign.models import resolve_model_path

                # Under ZeRO-3 the policy's parameters are already partitioned: a deep copy would carry
                # empty shards, so the trunk is loaded again (and partitioned on its own).
                source = args.value_model_name_or_path or (
                    model.config._name_or_path if is_deepspeed_zero3_enabled() else None
                )
                if source:
                    trunk = AutoModel.from_pretrained(resolve_model_path(source), dtype=model.dtype)
            attach_value_function(model, args.value_function, trunk)
        else:  # a model that already carries V_φ (built by the caller)
            if args.value_init == "mean_return":  # before the reference statistics, the first heavy step
                raise ValueError("value_init='mean_return' starts a fresh V_φ, but this model already carries one: "
                                 "use value_init='zero' to keep it")  # fmt: skip
            register_value_hook(unwrap_base(model))
        if peft_config is not None:
            # LoRA adapts the trunks; the freshly initialised head must train in full and be saved with the adapter.
            peft_config = copy.deepcopy(peft_config)
            peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | {"value_head"})
        return super()._prepare_model(model, args, peft_config)

    def batch_loss(self, model, inputs):
        return dqo_batch_loss(model, inputs, self.args, owner=unwrap_base(model))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        value_lr = self.args.value_learning_rate
        if value_lr is None or getattr(self, "_value_groups_split", False):
            return optimizer
        # Split each (decay / no-decay) group into policy and value parts; the scheduler, built after
        # this, scales every group's own initial learning rate.
        model = self.model if model is None else model
        value_ids = {id(p) for n, p in model.named_parameters() if any(m in n.split(".") for m in VALUE_MODULES)}
        groups = []
        for group in optimizer.param_groups:
            policy = [p for p in group["params"] if id(p) not in value_ids]
            value = [p for p in group["params"] if id(p) in value_ids]
            groups += [{**group, "params": policy}] if policy else []
            groups += [{**group, "params": value, "lr": value_lr}] if value else []
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        self._value_groups_split = True
        return optimizer
