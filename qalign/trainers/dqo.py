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
from dataclasses import dataclass, field

import torch
from torch import nn

from qalign.losses.dqo import dqo_losses
from qalign.trainers.offline import OfflineConfig, OfflineTrainer, completion_token_stats, model_inputs, unwrap_base

VALUE_MODULES = ("value_head", "value_trunk")


@dataclass
class DQOConfig(OfflineConfig):
    """OfflineConfig plus the λ-return, importance weights and the value function V_φ."""

    lam: float = field(default=1.0, metadata={"help": "λ of the λ-return, in [0, 1]; the paper found 1.0 beat 0.95."})
    importance_sampling: str = field(
        default="cumulative",
        metadata={"help": "Importance weights of π_θ against the sampler, detached and clipped: 'cumulative' "
                  "(prefix ratio Π_{k≤h} π_θ/π_b), 'token' (π_θ/π_b of the token) or 'none'."},
    )
    is_clip: float = field(default=1.0, metadata={"help": "Upper clip c of the importance weights, > 0."})
    value_function: str = field(
        default="head",
        metadata={"help": "'head': a scalar head on the policy's last hidden state (detached: L_V trains the head "
                  "only). 'model': a separate trunk (copied from the policy, or value_model_name_or_path) with its "
                  "own head."},
    )
    value_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Trunk of the value model for value_function='model' (default: a copy of the policy's)."},
    )
    value_loss_coef: float = field(default=1.0, metadata={"help": "Weight of L_V in the summed loss L_π + c·L_V."})
    value_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of V_φ's own parameters (head, separate trunk) as a separate optimizer "
                  "parameter group; default: learning_rate. A fresh zero-initialised head often wants more."},
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
    (``value_trunk`` or a deep copy of the policy's decoder trunk). Call before wrapping with PEFT."""
    if kind == "model":
        trunk = value_trunk if value_trunk is not None else copy.deepcopy(model.get_decoder())
        model.add_module("value_trunk", trunk)
        model.add_module("value_head", ValueHead(trunk.config.hidden_size))
    elif kind == "head":
        model.add_module("value_head", ValueHead(model.config.hidden_size))
    else:
        raise ValueError(f"value function must be 'head' or 'model', got {kind!r}")
    return model


def state_values(owner: nn.Module, batch: dict[str, torch.Tensor], policy_hidden: torch.Tensor | None) -> torch.Tensor:
    """V_φ(s_t) ``(B, C)`` at the states that produce each completion token.

    ``owner`` holds ``value_head`` (and ``value_trunk``); ``policy_hidden`` is the policy's last hidden
    state at those positions, used when there is no separate trunk. It is detached: L_V is a loss in φ
    alone, so V_φ reads the policy's features without training them (a shared trunk trained by L_V
    too measurably hurt the policy in the demo: held-out accuracy 0.42 → 0.30).
    """
    if hasattr(owner, "value_trunk"):
        width_c = batch["completion_ids"].size(1)
        inputs = model_inputs(batch)
        hidden = owner.value_trunk(**inputs, use_cache=False).last_hidden_state[:, -width_c - 1 : -1]
    else:
        hidden = policy_hidden.detach()
    return owner.value_head(hidden)


def dqo_batch_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], args: DQOConfig, owner: nn.Module | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(L_π + value_loss_coef · L_V, detached metrics) on one collated rollout batch.

    ``owner`` is the module holding the value function (default ``model``; the trainer passes the
    unwrapped base model, since DDP/PEFT wrappers hide attributes).
    """
    owner = model if owner is None else owner
    shared = not hasattr(owner, "value_trunk")
    stats = completion_token_stats(model, batch, hidden=shared)
    values = state_values(owner, batch, stats.hidden)
    mask = batch["action_mask"].bool()
    out = dqo_losses(
        stats.logprobs, batch["ref_logprobs"], values, batch["rewards"], mask,
        beta=args.beta, gamma=args.gamma, lam=args.lam, behavior_logprobs=batch.get("behavior_logprobs"),
        importance_sampling=args.importance_sampling, is_clip=args.is_clip,
        normalizer=args.loss_normalizer, max_length=args.max_completion_length,
    )  # fmt: skip
    loss = out.policy_loss + args.value_loss_coef * out.value_loss
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
    return loss, metrics


class DQOTrainer(OfflineTrainer):
    """Offline DQO on a rollout dataset. V_φ's parameters get ``value_learning_rate`` when set."""

    _tag_names = ["qalign", "dqo"]

    def _prepare_model(self, model, args: DQOConfig, peft_config):
        if not hasattr(unwrap_base(model), "value_head"):
            trunk = None
            if args.value_function == "model" and args.value_model_name_or_path:
                from transformers import AutoModel

                from qalign.models import resolve_model_path

                trunk = AutoModel.from_pretrained(resolve_model_path(args.value_model_name_or_path), dtype=model.dtype)
            attach_value_function(model, args.value_function, trunk)
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
