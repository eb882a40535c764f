"""Q#'s value model: a causal-LM trunk with a score head that predicts the distribution Z(s,a) of
π_ref's reward-to-go after taking token a in state s.

- **V-type** (default, the paper's): ``score = Linear(hidden, out)`` on the hidden state at the position
  of token a; the prefix ending with a *is* (s, a), so one forward of prefix+a scores one candidate.
- **Q-type** (ablation): ``score = Linear(hidden, |V|·out)`` on the hidden state of s, initialised from the
  trunk's ``lm_head`` (the authors' ``init_mode=reuse``); one forward of s scores every next token.

``out`` is 1 for a Bernoulli head (logit p̂, BCE, binary rewards) and ``num_atoms`` for a histogram over
evenly spaced atoms on [v_min, v_max] (MLE, general rewards).

The trunk is any HF model sharing π_ref's tokenizer; ``num_layers`` keeps only its first layers, so the
reference itself, cut to a few layers, is a small value model that costs little at decoding time.
Saved as an HF folder (the trunk) plus ``value_head.safetensors`` and ``qsharp_value.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qalign.losses.qsharp import VALUE_HEADS

CONFIG_NAME = "qsharp_value.json"
HEAD_WEIGHTS = "value_head.safetensors"
ADAPTER_DIR = "trunk_adapter"
VALUE_TYPES = ("v", "q")


@dataclass
class ValueHeadConfig:
    """What the head predicts; stored in ``qsharp_value.json``."""

    head: str = "bernoulli"  # bernoulli | histogram
    value_type: str = "v"  # v | q
    num_atoms: int = 11
    v_min: float = 0.0
    v_max: float = 1.0
    vocab_size: int | None = None  # Q-type only
    base_model: str | None = None  # what the trunk was cut from (needed to rebuild a LoRA trunk)
    num_layers: int | None = None  # trunk layers kept (None: all)

    def __post_init__(self) -> None:
        if self.head not in VALUE_HEADS:
            raise ValueError(f"value head must be one of {VALUE_HEADS}, got {self.head!r}")
        if self.value_type not in VALUE_TYPES:
            raise ValueError(f"value type must be one of {VALUE_TYPES}, got {self.value_type!r}")
        if self.head == "histogram" and (self.num_atoms < 2 or not self.v_min < self.v_max):
            raise ValueError("a histogram head needs num_atoms >= 2 and v_min < v_max")

    @property
    def outputs_per_action(self) -> int:
        return 1 if self.head == "bernoulli" else self.num_atoms


class QSharpValueModel(nn.Module):
    """Trunk + score head. ``forward`` returns the head's output for the action at every position.

    Args:
        trunk: a module called as ``trunk(input_ids=, attention_mask=, position_ids=, past_key_values=,
            use_cache=)`` returning ``.last_hidden_state`` ``(B, T, H)`` (an HF base model such as
            ``LlamaModel``; tests pass tabular ones).
        hidden_size: H.
        config: the head's settings.
        init_weight: ``(|V|, H)`` weights for a Q-type head (the reference's ``lm_head``); random otherwise.
    """

    def __init__(
        self, trunk: nn.Module, hidden_size: int, config: ValueHeadConfig, init_weight: torch.Tensor | None = None
    ):
        super().__init__()
        self.trunk = trunk
        self.head_config = config
        if config.value_type == "q" and not config.vocab_size:
            raise ValueError("a Q-type head needs vocab_size (from_reference fills it in)")
        out = config.outputs_per_action
        width = out if config.value_type == "v" else config.vocab_size * out
        self.score = nn.Linear(hidden_size, width)
        with torch.no_grad():
            if init_weight is not None and config.value_type == "q":
                # Reuse lm_head: row (token, atom) starts as the token's output embedding.
                self.score.weight.copy_(init_weight.to(self.score.weight).repeat_interleave(out, dim=0))
            else:
                self.score.weight.normal_(0.0, 0.02)
            self.score.bias.zero_()
        self.register_buffer("atoms", torch.linspace(config.v_min, config.v_max, config.num_atoms), persistent=False)

    # ------------------------------------------------------------------ forward pieces

    @property
    def device(self) -> torch.device:
        return self.score.weight.device

    @property
    def head(self) -> str:
        return self.head_config.head

    # Gradient checkpointing is the trunk's (Trainer's `gradient_checkpointing: true` and TRL's unwrap for
    # generation ask the trained module).
    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.trunk, "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.trunk.gradient_checkpointing_disable()

    @property
    def value_type(self) -> str:
        return self.head_config.value_type

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """``(B, T, H)`` last hidden states. ``attention_mask`` may be 2D or a prepared 4D additive mask."""
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        out = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache,
        )  # fmt: skip
        return out.last_hidden_state

    def _shape(self, values: torch.Tensor) -> torch.Tensor:
        """``(..., out)`` → ``(...)`` for Bernoulli, ``(..., A)`` for histogram."""
        return values.squeeze(-1) if self.head == "bernoulli" else values

    def v_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """V-type: ``(..., H)`` hidden of prefixes ending with the action → ``(...)`` or ``(..., A)``."""
        return self._shape(self.score(self._for_head(hidden)))

    def _for_head(self, hidden: torch.Tensor) -> torch.Tensor:
        # The head is built in float32 whatever dtype the trunk was loaded in; under autocast (training) the
        # matmul reconciles the two, outside it (guided decoding) a bf16 trunk's states must be upcast here.
        return hidden.to(self.score.weight.dtype)

    def q_values(self, hidden: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        """Q-type: ``(..., H)`` hidden of states → head outputs of ``actions`` ``(..., K)`` (or all tokens).

        Returns ``(..., K)`` / ``(..., K, A)``. Only the rows of the gathered actions are multiplied, so a
        histogram head over a 50k vocabulary never materialises ``(B, T, |V|, A)``.
        """
        out = self.head_config.outputs_per_action
        hidden = self._for_head(hidden)
        weight = self.score.weight.view(-1, out, hidden.size(-1))  # (|V|, out, H)
        bias = self.score.bias.view(-1, out)
        if actions is None:
            values = (hidden @ self.score.weight.t() + self.score.bias).unflatten(-1, (-1, out))
        else:
            values = torch.einsum("...h,...koh->...ko", hidden, weight[actions]) + bias[actions]
        return self._shape(values)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Head output for the action ``input_ids[:, t]`` taken in state ``input_ids[:, :t]``, for every t.

        Returns ``(B, T)`` (Bernoulli logits) or ``(B, T, A)`` (atom logits); position 0 of a Q-type model
        has no state before it and is zero.
        """
        hidden = self.hidden(input_ids, attention_mask, position_ids)
        if self.value_type == "v":
            return self.v_values(hidden)
        values = self.q_values(hidden[:, :-1], input_ids[:, 1:].unsqueeze(-1))
        values = values.squeeze(2) if values.dim() == 4 else values.squeeze(-1)
        return torch.cat([torch.zeros_like(values[:, :1]), values], dim=1)

    # ------------------------------------------------------------------ build, save, load

    @classmethod
    def from_reference(
        cls,
        name_or_path: str,
        config: ValueHeadConfig,
        dtype: str | torch.dtype = "float32",
        peft_config: Any = None,
        **load_kwargs: Any,
    ) -> QSharpValueModel:
        """Trunk = the causal LM at ``name_or_path`` without its LM head, cut to ``config.num_layers``;
        ``load_kwargs`` go to ``from_pretrained`` (the model options of ``qalign.models.model_init_kwargs``)."""
        from qalign.models import load_model

        causal = load_model(name_or_path, dtype, **load_kwargs)
        init_weight = causal.get_output_embeddings().weight.detach().clone() if config.value_type == "q" else None
        if config.value_type == "q" and config.vocab_size is None:
            config.vocab_size = init_weight.size(0)
        config.base_model = config.base_model or name_or_path
        trunk = truncate_trunk(causal.base_model, config.num_layers)
        if peft_config is not None:
            trunk = _wrap_lora(trunk, peft_config)
        return cls(trunk, trunk.config.hidden_size, config, init_weight)

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trunk (or its LoRA adapter), the head and the head config.

        ``state_dict``: this model's whole tensors, when its parameters are sharded (FSDP2): see
        ``qalign.distributed.full_state_dict``.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state_dict = self.state_dict() if state_dict is None else state_dict
        trunk_state = {k.removeprefix("trunk."): v for k, v in state_dict.items() if k.startswith("trunk.")}
        score_state = {k.removeprefix("score."): v for k, v in state_dict.items() if k.startswith("score.")}
        if hasattr(self.trunk, "peft_config"):
            # The adapter only; the base is rebuilt on load.
            self.trunk.save_pretrained(folder / ADAPTER_DIR, state_dict=trunk_state)
        else:
            self.trunk.save_pretrained(folder, state_dict=trunk_state, safe_serialization=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in score_state.items()}, folder / HEAD_WEIGHTS)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.head_config), indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: str | torch.dtype = "float32") -> QSharpValueModel:
        """Load a saved value model (a LoRA trunk is merged into its rebuilt base for fast decoding)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        folder = Path(folder)
        config = ValueHeadConfig(**json.loads((folder / CONFIG_NAME).read_text()))
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        if (folder / ADAPTER_DIR).is_dir():
            from peft import PeftModel

            from qalign.models import load_model

            base = truncate_trunk(load_model(config.base_model, dtype).base_model, config.num_layers)
            trunk = PeftModel.from_pretrained(base, str(folder / ADAPTER_DIR)).merge_and_unload()
        else:
            from qalign.models import real_weights_on_every_process

            with real_weights_on_every_process():
                trunk = AutoModel.from_pretrained(folder, dtype=torch_dtype)
        model = cls(trunk, trunk.config.hidden_size, config)
        model.score.load_state_dict(load_file(folder / HEAD_WEIGHTS))
        return model.to(trunk.dtype)


def truncate_trunk(trunk: nn.Module, num_layers: int | None) -> nn.Module:
    """Keep the first ``num_layers`` decoder layers (a smaller model sharing the tokenizer)."""
    if num_layers is None:
        return trunk
    layers = getattr(trunk, "layers", None)
    if layers is None:
        raise ValueError(f"cannot cut {type(trunk).__name__} to {num_layers} layers: it has no .layers")
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"value_num_layers must be in [1, {len(layers)}], got {num_layers}")
    trunk.layers = nn.ModuleList(list(layers)[:num_layers])
    trunk.config.num_hidden_layers = num_layers
    if getattr(trunk.config, "layer_types", None):
        trunk.config.layer_types = list(trunk.config.layer_types)[:num_layers]
    return trunk


def _wrap_lora(trunk: nn.Module, peft_config: Any) -> nn.Module:
    """LoRA on the trunk; the score head stays fully trainable (it is outside the PEFT model)."""
    import copy

    from peft import get_peft_model

    peft_config = copy.deepcopy(peft_config)
    peft_config.task_type = None  # a bare base model: no LM-head-specific PEFT wrapper
    return get_peft_model(trunk, peft_config)
